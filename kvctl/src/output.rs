//! Printing results: aligned columns for people, JSON for scripts.

use serde::Serialize;

use crate::cli::Output;

/// A table: a header row and rows of cells, printed with columns aligned.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table with these column names.
    pub fn new(header: &[&'static str]) -> Self {
        Table {
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text, columns separated by two spaces, no trailing spaces.
    pub fn render(&self) -> String {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.header.iter().map(|h| h.to_string()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate().take(columns) {
                if i + 1 == columns {
                    line.push_str(cell);
                } else {
                    let pad = widths[i] - cell.chars().count();
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Prints `value` as JSON, or `table` for people.
pub fn print<T: Serialize>(out: Output, value: &T, table: impl FnOnce() -> String) {
    match out {
        Output::Json => match serde_json::to_string_pretty(value) {
            Ok(text) => println!("{text}"),
            Err(e) => eprintln!("Error: cannot encode the answer as JSON: {e}"),
        },
        Output::Table => print!("{}", table()),
    }
}

/// One line of a stream: compact JSON, or `text`.
pub fn line<T: Serialize>(out: Output, value: &T, text: impl FnOnce() -> String) {
    match out {
        Output::Json => match serde_json::to_string(value) {
            Ok(text) => println!("{text}"),
            Err(e) => eprintln!("Error: cannot encode the answer as JSON: {e}"),
        },
        Output::Table => println!("{}", text()),
    }
}

/// `n` bytes in the largest binary unit that keeps a number ≥ 1 (`1.5 MiB`).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// How long ago `ms` (ms since the Unix epoch) was, roughly (`3s`, `4m`, `2h`, `5d`).
pub fn age(ms: u64, now_ms: u64) -> String {
    let secs = now_ms.saturating_sub(ms) / 1000;
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let mut t = Table::new(&["NAME", "HOLDER", "WAITING"]);
        t.row(vec!["locks/a".into(), "locks/a/1".into(), "0".into()]);
        t.row(vec!["b".into(), "b/22".into(), "12".into()]);
        assert_eq!(
            t.render(),
            "NAME     HOLDER     WAITING\nlocks/a  locks/a/1  0\nb        b/22       12\n"
        );
    }

    #[test]
    fn sizes_and_ages() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024), "3.0 MiB");
        assert_eq!(age(1_000, 4_500), "3s");
        assert_eq!(age(0, 7_200_000), "2h");
    }
}
