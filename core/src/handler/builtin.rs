//! Built-in handlers that need no configuration: `noop`, `spin`, `sleep` and `digest`.
//!
//! This module owns their argument grammar and the shared argument helpers ([`check_known`],
//! [`parse_whole`]). Invariant: `validate` and `run` parse arguments with the same function, so
//! an item that passed `validate` runs with exactly the values that were checked, and `run`
//! re-checks anyway (an item that skipped `validate` fails with the same text instead of running
//! with a guessed value).
//!
//! Test affordances: `noop` and `spin` take `fail=TEXT` (the item ends with
//! [`HandlerError::Failed`]`(TEXT)`) and `panic=1` (the handler panics), so the engine's failure
//! and panic paths can be driven end to end. `spin` applies them after it has spun.

use std::time::{Duration, Instant};

use sha2::{Sha256, Sha512};

use super::{Args, Handler, HandlerError, HandlerKind, WorkCtx};

/// The longest `spin` or `sleep` accepted: 10 minutes.
pub const MAX_DURATION: Duration = Duration::from_secs(600);

/// How often `spin` looks at its cancel token.
const SPIN_CANCEL_EVERY: Duration = Duration::from_millis(1);

/// `digest` hashes the payload in chunks of this size and checks cancel between chunks.
const DIGEST_CHUNK: usize = 1 << 20;

/// Rejects any argument whose name is not in `allowed`, naming every offender.
///
/// # Errors
/// [`HandlerError::InvalidArgument`] listing the unknown names and the allowed ones.
pub fn check_known(handler: &str, args: &Args, allowed: &[&str]) -> Result<(), HandlerError> {
    if args.is_empty() {
        return Ok(());
    }
    let unknown: Vec<&str> = args
        .keys()
        .map(String::as_str)
        .filter(|k| !allowed.contains(k))
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    let allowed = if allowed.is_empty() {
        "none".to_string()
    } else {
        allowed.join(", ")
    };
    Err(HandlerError::InvalidArgument(format!(
        "{handler}: unknown argument{} {} (allowed: {allowed})",
        if unknown.len() == 1 { "" } else { "s" },
        unknown.join(", "),
    )))
}

/// Parses a whole number argument; `unit` names what it counts, for the error text.
///
/// # Errors
/// [`HandlerError::InvalidArgument`]: `ms must be a whole number of milliseconds, got "abc"`.
pub fn parse_whole(name: &str, value: &str, unit: &str) -> Result<u64, HandlerError> {
    // `u64::from_str` accepts a leading '+'; a whole number here is digits only.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(whole_err(name, value, unit));
    }
    value.parse().map_err(|_| whole_err(name, value, unit))
}

fn whole_err(name: &str, value: &str, unit: &str) -> HandlerError {
    HandlerError::InvalidArgument(format!(
        "{name} must be a whole number of {unit}, got {value:?}"
    ))
}

/// Maps a parse error found by `run` (an item that skipped or outlived `validate`) to the error
/// kind `run` may return, keeping the text.
fn in_run(e: HandlerError) -> HandlerError {
    match e {
        HandlerError::InvalidArgument(_) => HandlerError::Failed(e.to_string()),
        other => other,
    }
}

/// The test affordances shared by `noop` and `spin`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Succeed,
    Fail(String),
    Panic,
}

impl Outcome {
    fn parse(handler: &str, args: &Args) -> Result<Self, HandlerError> {
        match (args.get("fail"), args.get("panic")) {
            (Some(_), Some(_)) => Err(HandlerError::InvalidArgument(format!(
                "{handler}: fail and panic are mutually exclusive"
            ))),
            (Some(text), None) if text.is_empty() => Err(HandlerError::InvalidArgument(
                "fail needs a non-empty message".to_string(),
            )),
            (Some(text), None) => Ok(Self::Fail(text.clone())),
            (None, Some(v)) if v == "1" => Ok(Self::Panic),
            (None, Some(v)) => Err(HandlerError::InvalidArgument(format!(
                "panic must be 1, got {v:?}"
            ))),
            (None, None) => Ok(Self::Succeed),
        }
    }

    /// Applies the outcome to a successful output.
    fn apply(self, handler: &str, item: u64, out: Vec<u8>) -> Result<Vec<u8>, HandlerError> {
        match self {
            Self::Succeed => Ok(out),
            Self::Fail(text) => {
                tracing::debug!(handler, item, "failing on request (fail=)");
                Err(HandlerError::Failed(text))
            }
            Self::Panic => {
                tracing::debug!(handler, item, "panicking on request (panic=1)");
                panic!("{handler}: panic requested by item {item} (panic=1)");
            }
        }
    }
}

/// `noop`: does nothing and returns empty output. Arguments: only the test affordances
/// `fail=TEXT` and `panic=1`. The payload is ignored. CPU-bound (it holds its slot for the
/// moment it runs).
#[derive(Debug, Clone, Copy, Default)]
pub struct Noop;

impl Noop {
    const ARGS: &'static [&'static str] = &["fail", "panic"];

    fn parse(args: &Args) -> Result<Outcome, HandlerError> {
        // Most noop items have no arguments: nothing to check (the checks were about 5% of
        // a dispatched noop item's instructions).
        if args.is_empty() {
            return Ok(Outcome::Succeed);
        }
        check_known("noop", args, Self::ARGS)?;
        Outcome::parse("noop", args)
    }
}

impl Handler for Noop {
    fn name(&self) -> &str {
        "noop"
    }
    fn validate(&self, args: &Args, _payload: &[u8]) -> Result<(), HandlerError> {
        Self::parse(args).map(drop)
    }
    fn run(&self, ctx: &WorkCtx<'_>) -> Result<Vec<u8>, HandlerError> {
        let outcome = Self::parse(ctx.args).map_err(in_run)?;
        if ctx.cancel.is_cancelled() {
            return Err(HandlerError::Cancelled);
        }
        outcome.apply("noop", ctx.item, Vec::new())
    }
}

/// `spin`: a real busy loop for `ms=N` or `us=N` (exactly one; at most [`MAX_DURATION`]),
/// looking at the cancel token about every millisecond. Output: the number of loop iterations
/// as decimal ASCII. Also takes `fail=TEXT` / `panic=1`, applied after the spin.
#[derive(Debug, Clone, Copy, Default)]
pub struct Spin;

#[derive(Debug)]
struct SpinArgs {
    dur: Duration,
    outcome: Outcome,
}

impl Spin {
    const ARGS: &'static [&'static str] = &["ms", "us", "fail", "panic"];

    fn parse(args: &Args) -> Result<SpinArgs, HandlerError> {
        check_known("spin", args, Self::ARGS)?;
        let dur = match (args.get("ms"), args.get("us")) {
            (Some(v), None) => Duration::from_millis(parse_whole("ms", v, "milliseconds")?),
            (None, Some(v)) => Duration::from_micros(parse_whole("us", v, "microseconds")?),
            (None, None) => {
                return Err(HandlerError::InvalidArgument(
                    "spin needs exactly one of ms, us (got none)".to_string(),
                ))
            }
            (Some(_), Some(_)) => {
                return Err(HandlerError::InvalidArgument(
                    "spin needs exactly one of ms, us (got both)".to_string(),
                ))
            }
        };
        check_cap("spin", dur)?;
        Ok(SpinArgs {
            dur,
            outcome: Outcome::parse("spin", args)?,
        })
    }
}

fn check_cap(handler: &str, dur: Duration) -> Result<(), HandlerError> {
    if dur > MAX_DURATION {
        return Err(HandlerError::InvalidArgument(format!(
            "{handler}: {dur:?} exceeds the limit of {MAX_DURATION:?}"
        )));
    }
    Ok(())
}

/// One unit of busy work: a xorshift step the optimizer cannot drop.
#[inline]
fn churn(x: u64) -> u64 {
    let mut x = std::hint::black_box(x);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::hint::black_box(x)
}

impl Handler for Spin {
    fn name(&self) -> &str {
        "spin"
    }
    fn validate(&self, args: &Args, _payload: &[u8]) -> Result<(), HandlerError> {
        Self::parse(args).map(drop)
    }
    fn run(&self, ctx: &WorkCtx<'_>) -> Result<Vec<u8>, HandlerError> {
        let SpinArgs { dur, outcome } = Self::parse(ctx.args).map_err(in_run)?;
        if ctx.cancel.is_cancelled() {
            return Err(HandlerError::Cancelled);
        }
        let start = Instant::now();
        let deadline = start + dur;
        let mut next_check = start + SPIN_CANCEL_EVERY;
        let mut state = ctx.item | 1; // xorshift must not start at 0
        let mut iterations: u64 = 0;
        loop {
            // A small batch between clock reads keeps the clock out of the measurement while
            // the cancel check stays well under a millisecond apart.
            for _ in 0..64 {
                state = churn(state);
            }
            iterations += 64;
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            if now >= next_check {
                if ctx.cancel.is_cancelled() {
                    tracing::debug!(item = ctx.item, iterations, "spin cancelled");
                    return Err(HandlerError::Cancelled);
                }
                next_check = now + SPIN_CANCEL_EVERY;
            }
        }
        std::hint::black_box(state);
        tracing::trace!(item = ctx.item, iterations, ?dur, "spin done");
        outcome.apply("spin", ctx.item, iterations.to_string().into_bytes())
    }
}

/// `sleep`: waits `ms=N` (at most [`MAX_DURATION`]) on the cancel token, so a cancel ends it
/// at once. Output: empty. [`HandlerKind::Waits`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Sleep;

impl Sleep {
    fn parse(args: &Args) -> Result<Duration, HandlerError> {
        check_known("sleep", args, &["ms"])?;
        let v = args.get("ms").ok_or_else(|| {
            HandlerError::InvalidArgument("sleep needs ms (got none)".to_string())
        })?;
        let dur = Duration::from_millis(parse_whole("ms", v, "milliseconds")?);
        check_cap("sleep", dur)?;
        Ok(dur)
    }
}

impl Handler for Sleep {
    fn name(&self) -> &str {
        "sleep"
    }
    fn kind(&self) -> HandlerKind {
        HandlerKind::Waits
    }
    fn validate(&self, args: &Args, _payload: &[u8]) -> Result<(), HandlerError> {
        Self::parse(args).map(drop)
    }
    fn run(&self, ctx: &WorkCtx<'_>) -> Result<Vec<u8>, HandlerError> {
        let dur = Self::parse(ctx.args).map_err(in_run)?;
        if ctx.cancel.wait_timeout(dur) {
            tracing::debug!(item = ctx.item, "sleep cancelled");
            return Err(HandlerError::Cancelled);
        }
        Ok(Vec::new())
    }
}

/// `digest`: hashes the payload with `algo=sha256` (default) or `algo=sha512`. Output: the
/// lowercase hex digest as ASCII. Checks cancel between 1 MiB chunks. CPU-bound.
#[derive(Debug, Clone, Copy, Default)]
pub struct Digest;

#[derive(Debug, Clone, Copy)]
enum Algo {
    Sha256,
    Sha512,
}

impl Digest {
    fn parse(args: &Args) -> Result<Algo, HandlerError> {
        check_known("digest", args, &["algo"])?;
        match args.get("algo").map(String::as_str) {
            None | Some("sha256") => Ok(Algo::Sha256),
            Some("sha512") => Ok(Algo::Sha512),
            Some(other) => Err(HandlerError::InvalidArgument(format!(
                "algo must be sha256 or sha512, got {other:?}"
            ))),
        }
    }

    fn hash<D: sha2::Digest>(ctx: &WorkCtx<'_>) -> Result<Vec<u8>, HandlerError> {
        let mut h = D::new();
        for chunk in ctx.payload.chunks(DIGEST_CHUNK) {
            if ctx.cancel.is_cancelled() {
                return Err(HandlerError::Cancelled);
            }
            h.update(chunk);
        }
        Ok(hex::encode(h.finalize()).into_bytes())
    }
}

impl Handler for Digest {
    fn name(&self) -> &str {
        "digest"
    }
    fn validate(&self, args: &Args, _payload: &[u8]) -> Result<(), HandlerError> {
        Self::parse(args).map(drop)
    }
    fn run(&self, ctx: &WorkCtx<'_>) -> Result<Vec<u8>, HandlerError> {
        if ctx.cancel.is_cancelled() {
            return Err(HandlerError::Cancelled);
        }
        match Self::parse(ctx.args).map_err(in_run)? {
            Algo::Sha256 => Self::hash::<Sha256>(ctx),
            Algo::Sha512 => Self::hash::<Sha512>(ctx),
        }
    }
}
