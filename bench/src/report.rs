//! Markdown output: tables of min/median/max figures and the verdict on each target.

use std::fmt::Write as _;

use crate::stats::Spread;

/// One markdown table.
#[derive(Debug, Clone, Default)]
pub struct Table {
    pub title: String,
    /// A sentence under the title saying what was measured and how.
    pub note: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(title: &str, note: &str, header: &[&str]) -> Table {
        Table {
            title: title.into(),
            note: note.into(),
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn markdown(&self) -> String {
        let mut s = format!("### {}\n\n", self.title);
        if !self.note.is_empty() {
            let _ = writeln!(s, "{}\n", self.note);
        }
        let _ = writeln!(s, "| {} |", self.header.join(" | "));
        let _ = writeln!(s, "|{}", "---|".repeat(self.header.len()));
        for r in &self.rows {
            let _ = writeln!(s, "| {} |", r.join(" | "));
        }
        s
    }
}

/// Whether a target is met, with the figure that says so.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub target: String,
    pub met: bool,
    pub measured: String,
}

impl Verdict {
    pub fn new(target: &str, met: bool, measured: String) -> Verdict {
        Verdict {
            target: target.into(),
            met,
            measured,
        }
    }
}

/// The verdicts as a markdown table.
pub fn verdicts(v: &[Verdict]) -> String {
    let mut t = Table::new(
        "Targets",
        "Judged on the medians of this run.",
        &["target", "measured (median)", "met"],
    );
    for x in v {
        t.row(vec![
            x.target.clone(),
            x.measured.clone(),
            if x.met { "met" } else { "**not met**" }.into(),
        ]);
    }
    t.markdown()
}

/// `min / median / max` with `digits` decimals.
pub fn spread(s: Spread, digits: usize) -> String {
    format!(
        "{:.d$} / {:.d$} / {:.d$}",
        s.min,
        s.median,
        s.max,
        d = digits
    )
}

/// A rate in a short human form (k, M).
pub fn rate(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// `min / median / max` of rates.
pub fn rate_spread(s: Spread) -> String {
    format!("{} / {} / {}", rate(s.min), rate(s.median), rate(s.max))
}

/// Nanoseconds in a short human form.
pub fn dur_ns(x: f64) -> String {
    if x < 0.0 {
        return format!("−{}", dur_ns(-x));
    }
    if x >= 1e9 {
        format!("{:.2}s", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.2}ms", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}µs", x / 1e3)
    } else {
        format!("{x:.0}ns")
    }
}

/// `min / median / max` of nanosecond figures.
pub fn dur_spread(s: Spread) -> String {
    format!(
        "{} / {} / {}",
        dur_ns(s.min),
        dur_ns(s.median),
        dur_ns(s.max)
    )
}
