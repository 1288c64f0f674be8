//! The command line of `wqctl`: every flag and subcommand, with the help text users see.
//!
//! Invariant: parsing only — no I/O and no daemon calls happen here, so `--help` and usage
//! errors (exit 2) never need a running daemon.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the request failed: a gRPC status, a connection error or a local I/O error
     (one line on stderr: `wqctl: <CODE>: <message>`)
  2  usage error (bad flags or arguments)
  3  the items completed, but not all ended OK (failed, cancelled, expired or
     rejected) — from `submit --wait|--flush` and `flush`

Durations are written like 500us, 10ms, 2s, 1m30s.
With --output json every command prints exactly one JSON document on stdout
(`topology --watch` prints one per line, one per snapshot).";

/// Control and query wqd, the CPU-group work queue daemon.
#[derive(Debug, Parser)]
#[command(name = "wqctl", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// Unix socket of the daemon [default: $XDG_RUNTIME_DIR/wqd/wqd.sock for non-root users,
    /// else /run/wqd/wqd.sock]
    #[arg(long, global = true, env = "WQD_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Daemon address: unix:/path or http(s)://host:port (takes precedence over --socket)
    #[arg(long, global = true, env = "WQD_ADDR", value_name = "URL")]
    pub addr: Option<String>,
    /// PEM CA certificate(s) the daemon's TLS certificate must chain to (https:// addresses)
    #[arg(long, global = true, env = "WQD_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate for a daemon that requires one (mTLS); needs --tls-key
    #[arg(
        long,
        global = true,
        env = "WQD_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert
    #[arg(
        long,
        global = true,
        env = "WQD_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// File holding the bearer token for a daemon with `[security] token_file` (sent as
    /// `authorization: Bearer ...`); WQD_TOKEN gives the token itself
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The bearer token itself (prefer --token-file: the environment can leak)
    #[arg(
        long = "token",
        global = true,
        env = "WQD_TOKEN",
        hide_env_values = true,
        hide = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// Output format: human-readable text, or one JSON document on stdout
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Give up on each call after this long (sent to the daemon as the gRPC deadline; a
    /// flush that times out leaves the work running)
    #[arg(long, global = true, value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Option<Duration>,
    /// Talk to a fleet of daemons over NATS JetStream instead of one daemon: `submit` and
    /// `flush` go to the fleet, and `fleet hosts` lists its members (comma-separated URLs
    /// name several servers)
    #[arg(
        long,
        global = true,
        env = "WQD_FLEET",
        value_name = "nats://HOST:PORT"
    )]
    pub fleet: Option<String>,
    /// NATS credentials file (.creds) for --fleet
    #[arg(long, global = true, env = "WQD_FLEET_CREDS", value_name = "FILE")]
    pub fleet_creds: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show CPUs (online / allowed / isolated / live, busy %), groups per level with their
    /// live members, and the topology epoch
    Topology {
        /// Keep running and print every new snapshot as the topology changes
        #[arg(long)]
        watch: bool,
    },
    /// Submit a batch of identical items; with --wait or --flush, print a summary (counts by
    /// state, items per CPU, fallbacks, re-binds, latency percentiles)
    Submit(SubmitArgs),
    /// Wait for items, a batch, or a whole workqueue, printing results as a summary
    Flush(FlushArgs),
    /// Cancel items or a batch: pending items are removed, running ones are waited for
    Cancel(CancelArgs),
    /// Wait until a workqueue has nothing pending or running (new submissions to it are
    /// refused meanwhile)
    Drain {
        /// The workqueue
        #[arg(default_value = "default")]
        workqueue: String,
    },
    /// Create, list, update or delete workqueues
    #[command(subcommand)]
    Wq(WqCommand),
    /// Show the results (or current state) of items by id
    Results {
        /// Item ids
        #[arg(required = true, value_name = "ID")]
        ids: Vec<u64>,
    },
    /// Show daemon-wide counters
    Stats,
    /// List attached workers: id, pid, uid, name, handlers, slots as CPU:IN_FLIGHT/DONE,
    /// items done and handed back, time attached
    Workers,
    /// The fleet (needs --fleet)
    #[command(subcommand)]
    Fleet(FleetCommand),
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// List the fleet's members from their host records: name, live CPUs, groups, load,
    /// items pending and running, version, record age
    Hosts,
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Where to run: cpu:N core:N cache:N shard:N node:N package:N cpus:LIST all NAME NAME:N,
    /// or each:LEVEL / each:PARTITION for one item per group (a per-group table with --wait)
    #[arg(long, short = 't')]
    pub target: String,
    /// Handler name (noop, spin, sleep, digest, exec if configured)
    #[arg(long = "handler")]
    pub handler: String,
    /// Handler argument KEY=VALUE (repeatable)
    #[arg(long = "arg", short = 'a', value_parser = parse_kv, value_name = "KEY=VALUE")]
    pub args: Vec<(String, String)>,
    /// How many identical items to submit; large batches go through the streaming call
    #[arg(long, short = 'n', default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: u64,
    /// Read the payload from FILE, or from standard input with `-`
    #[arg(long, value_name = "FILE")]
    pub payload_file: Option<PathBuf>,
    /// Workqueue to queue on
    #[arg(long, short = 'w', default_value = "default")]
    pub workqueue: String,
    /// De-duplication key: not queued again while an item with this key is pending (with
    /// --count, only the first item is queued)
    #[arg(long)]
    pub key: Option<String>,
    /// Delay before the items become runnable
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub delay: Option<Duration>,
    /// Items not started this long after submission end EXPIRED
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub deadline: Option<Duration>,
    /// Wait for every item in the submit call itself, then print the summary
    #[arg(long, conflicts_with = "flush")]
    pub wait: bool,
    /// Submit, then flush the batch (results stream back; a progress bar shows on a
    /// terminal), then print the summary
    #[arg(long)]
    pub flush: bool,
    /// Always use the streaming submit call, whatever the batch size
    #[arg(long)]
    pub stream: bool,
    /// With --fleet: which member runs the items: host=NAME, any (the first member with a
    /// live CPU in the target group) or each-host (one copy per member)
    #[arg(long, value_name = "SELECTOR", default_value = "any")]
    pub on: String,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ScopeArgs {
    /// Item ids (space- or comma-separated)
    #[arg(long, num_args = 1.., value_delimiter = ',', value_name = "ID")]
    pub items: Vec<u64>,
    /// A batch id
    #[arg(long, value_name = "ID")]
    pub batch: Option<u64>,
    /// Everything pending or running on this workqueue when the flush starts (flush only)
    #[arg(long, value_name = "NAME")]
    pub workqueue: Option<String>,
    /// A fleet batch id (with --fleet; the flush waits for a result of every item, bounded
    /// by --timeout, default 10m)
    #[arg(long, value_name = "ID")]
    pub fleet_batch: Option<String>,
}

#[derive(Debug, Args)]
pub struct FlushArgs {
    #[command(flatten)]
    pub scope: ScopeArgs,
    /// Do not stream per-item results; print only the final counts
    #[arg(long)]
    pub summary_only: bool,
    /// With --workqueue: also cover its delayed items, queueing them at once (by default a
    /// workqueue flush leaves them out and says how many). Item and batch flushes always
    /// queue the delayed items they name.
    #[arg(long)]
    pub include_delayed: bool,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct CancelArgs {
    /// Item ids (space- or comma-separated)
    #[arg(long, num_args = 1.., value_delimiter = ',', value_name = "ID")]
    pub items: Vec<u64>,
    /// A batch id
    #[arg(long, value_name = "ID")]
    pub batch: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PlacementArg {
    /// Lowest-numbered live CPU of the group with a free slot
    First,
    /// Round-robin over the group's live CPUs
    Spread,
    /// The live CPU with the fewest wqd items pending or running
    LeastLoaded,
    /// The live CPU the host reports least busy
    Idle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FallbackArg {
    /// Widen core → shard → cache → node → package → all until a CPU is live
    Widen,
    /// Keep items pending until a CPU of their group is live again
    Wait,
    /// End items REJECTED
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WorkerLostArg {
    /// The item ends failed ("worker lost"): at-most-once
    Fail,
    /// The item is queued again (idempotent work): at-least-once, said in its result
    Requeue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UnservedArg {
    /// Items wait for a worker serving their handler to attach (bounded by their deadline)
    Wait,
    /// Items are rejected while no attached worker serves their handler
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ResultsArg {
    /// A full result per item: streamed by flushes, kept for `wqctl results`
    Full,
    /// Counts and latencies only, no per-item result (kept only while the item is live)
    Summary,
    /// Counts only: as summary, without latency metrics
    None,
}

#[derive(Debug, Args)]
pub struct WqAttrArgs {
    /// Items that may run at once on each CPU
    #[arg(long)]
    pub max_active: Option<u32>,
    /// Items that may run at once across one group (0 = no cap)
    #[arg(long)]
    pub group_max_active: Option<u32>,
    /// Nice value of the workers (-20..19)
    #[arg(long, allow_negative_numbers = true)]
    pub nice: Option<i32>,
    /// How a CPU is picked among a group's live members
    #[arg(long, value_enum)]
    pub placement: Option<PlacementArg>,
    /// What happens when a group has no live CPU
    #[arg(long, value_enum)]
    pub fallback: Option<FallbackArg>,
    /// Most items that may be pending on the workqueue
    #[arg(long)]
    pub max_queued: Option<u64>,
    /// Attached-worker handlers: what an item becomes when the worker holding it is lost
    #[arg(long, value_enum)]
    pub on_worker_lost: Option<WorkerLostArg>,
    /// Attached-worker handlers: what an item does while no attached worker serves it
    #[arg(long, value_enum)]
    pub unserved: Option<UnservedArg>,
    /// What is kept of each item once it ends (summary and none keep no per-item result)
    #[arg(long, value_enum)]
    pub results: Option<ResultsArg>,
}

#[derive(Debug, Subcommand)]
pub enum WqCommand {
    /// Create a workqueue (unset attributes take the daemon's defaults)
    Create {
        /// Name: 1-64 characters from [A-Za-z0-9_.-]
        name: String,
        /// Items of one group run one at a time, in submission order
        #[arg(long)]
        ordered: bool,
        #[command(flatten)]
        attrs: WqAttrArgs,
    },
    /// List workqueues with their attributes and counters
    List {
        /// Only this workqueue
        name: Option<String>,
    },
    /// Change attributes of a workqueue (only the ones given)
    Update {
        name: String,
        /// Ordered or not
        #[arg(long, value_name = "BOOL")]
        ordered: Option<bool>,
        #[command(flatten)]
        attrs: WqAttrArgs,
    },
    /// Drain a workqueue, then delete it
    Delete {
        name: String,
        /// Cancel pending items instead of running them
        #[arg(long)]
        cancel_pending: bool,
    },
}

/// Parses `10ms`, `2s`, `1m30s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write durations like 10ms, 2s, 1m30s)"))
}

/// Parses `KEY=VALUE` (the value may contain `=`).
pub fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("wqctl").chain(args.iter().copied()))
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn tls_and_token_flags() {
        let cli = parse(&[
            "--addr",
            "https://h:7070",
            "--tls-ca",
            "ca.pem",
            "--tls-cert",
            "me.pem",
            "--tls-key",
            "me.key",
            "--token-file",
            "tok",
            "topology",
        ])
        .unwrap();
        assert_eq!(cli.tls_ca, Some(PathBuf::from("ca.pem")));
        assert_eq!(cli.tls_key, Some(PathBuf::from("me.key")));
        assert_eq!(cli.token_file, Some(PathBuf::from("tok")));
        // A certificate without its key (or the reverse) is a usage error.
        assert!(parse(&["--tls-cert", "me.pem", "topology"]).is_err());
        assert!(parse(&["--tls-key", "me.key", "topology"]).is_err());
    }

    #[test]
    fn submit_parses_everything() {
        let cli = parse(&[
            "--socket",
            "/tmp/s",
            "-o",
            "json",
            "submit",
            "--target",
            "cache:1",
            "--handler",
            "spin",
            "--arg",
            "ms=5",
            "-a",
            "x=a=b",
            "--count",
            "1000",
            "--payload-file",
            "-",
            "--workqueue",
            "w",
            "--key",
            "k",
            "--delay",
            "10ms",
            "--deadline",
            "2s",
            "--flush",
        ])
        .unwrap();
        assert_eq!(cli.output, Output::Json);
        assert_eq!(cli.socket, Some(PathBuf::from("/tmp/s")));
        let Command::Submit(s) = cli.command else {
            panic!("not submit")
        };
        assert_eq!(s.target, "cache:1");
        assert_eq!(
            s.args,
            vec![("ms".into(), "5".into()), ("x".into(), "a=b".into())]
        );
        assert_eq!(s.count, 1000);
        assert_eq!(s.payload_file, Some(PathBuf::from("-")));
        assert_eq!(s.delay, Some(Duration::from_millis(10)));
        assert_eq!(s.deadline, Some(Duration::from_secs(2)));
        assert!(s.flush && !s.wait);
    }

    #[test]
    fn usage_errors_are_rejected() {
        let kind = |a: &[&str]| parse(a).unwrap_err().kind();
        use clap::error::ErrorKind::*;
        assert_eq!(
            kind(&["submit", "--handler", "noop"]),
            MissingRequiredArgument
        );
        assert_eq!(
            kind(&[
                "submit",
                "-t",
                "all",
                "--handler",
                "noop",
                "--wait",
                "--flush"
            ]),
            ArgumentConflict
        );
        assert_eq!(
            kind(&[
                "submit",
                "-t",
                "all",
                "--handler",
                "noop",
                "--arg",
                "novalue"
            ]),
            ValueValidation
        );
        assert_eq!(
            kind(&[
                "submit",
                "-t",
                "all",
                "--handler",
                "noop",
                "--delay",
                "soon"
            ]),
            ValueValidation
        );
        assert_eq!(
            kind(&["submit", "-t", "all", "--handler", "noop", "-n", "0"]),
            ValueValidation
        );
        assert_eq!(kind(&["flush"]), MissingRequiredArgument);
        assert_eq!(
            kind(&["flush", "--batch", "1", "--workqueue", "w"]),
            ArgumentConflict
        );
        assert_eq!(kind(&["results"]), MissingRequiredArgument);
    }

    #[test]
    fn scopes_and_wq_commands() {
        let cli = parse(&["flush", "--items", "1,2", "3"]).unwrap();
        let Command::Flush(f) = cli.command else {
            panic!()
        };
        assert_eq!(f.scope.items, vec![1, 2, 3]);
        let cli = parse(&[
            "wq",
            "create",
            "fast",
            "--max-active",
            "4",
            "--ordered",
            "--nice",
            "-5",
            "--placement",
            "least-loaded",
        ])
        .unwrap();
        let Command::Wq(WqCommand::Create {
            name,
            ordered,
            attrs,
        }) = cli.command
        else {
            panic!()
        };
        assert_eq!(name, "fast");
        assert!(ordered);
        assert_eq!(attrs.nice, Some(-5));
        assert_eq!(attrs.placement, Some(PlacementArg::LeastLoaded));
        let cli = parse(&["wq", "update", "fast", "--ordered", "false"]).unwrap();
        let Command::Wq(WqCommand::Update { ordered, .. }) = cli.command else {
            panic!()
        };
        assert_eq!(ordered, Some(false));
        let cli = parse(&["drain"]).unwrap();
        assert!(matches!(cli.command, Command::Drain { workqueue } if workqueue == "default"));
    }

    #[test]
    fn help_documents_exit_codes() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("Exit codes"));
        assert!(help.contains("3  the items completed"));
    }
}
