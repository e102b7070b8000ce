//! Writing metrics in Prometheus' text exposition format 0.0.4.

use std::fmt::Write;

use super::Histogram;

/// Label pairs of one sample.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

/// A scrape's text, built one metric family at a time.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// The text built so far.
    pub fn finish(self) -> String {
        self.out
    }

    fn head(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: Labels<'_>, value: f64) {
        self.out.push_str(name);
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {}", number(value));
    }

    /// A gauge with one unlabelled sample.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        let none: Labels<'_> = &[];
        self.gauges(name, help, &[(none, value)]);
    }

    /// A gauge family; each sample's labels are any list of pairs (an array, a slice).
    pub fn gauges<'l, L: AsRef<[(&'l str, &'l str)]>>(
        &mut self,
        name: &str,
        help: &str,
        samples: &[(L, f64)],
    ) {
        self.family(
            name,
            help,
            "gauge",
            samples.iter().map(|(l, v)| (l.as_ref(), *v)),
        );
    }

    /// A family of plain samples of one `kind`.
    fn family<'s>(
        &mut self,
        name: &str,
        help: &str,
        kind: &str,
        samples: impl Iterator<Item = (Labels<'s>, f64)>,
    ) {
        self.head(name, help, kind);
        for (labels, value) in samples {
            self.sample(name, labels, value);
        }
    }

    /// A counter with one unlabelled sample.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        let none: Labels<'_> = &[];
        self.counters(name, help, &[(none, value)]);
    }

    /// A counter with one unlabelled sample that is not a whole number (CPU seconds).
    pub fn counter_f(&mut self, name: &str, help: &str, value: f64) {
        let none: Labels<'_> = &[];
        self.family(name, help, "counter", std::iter::once((none, value)));
    }

    /// A counter family.
    pub fn counters<'l, L: AsRef<[(&'l str, &'l str)]>>(
        &mut self,
        name: &str,
        help: &str,
        samples: &[(L, u64)],
    ) {
        let samples = samples.iter().map(|(l, v)| (l.as_ref(), *v as f64));
        self.family(name, help, "counter", samples);
    }

    /// A histogram with one unlabelled series.
    pub fn histogram(&mut self, name: &str, help: &str, histogram: &Histogram) {
        let none: Labels<'_> = &[];
        self.histograms(name, help, &[(none, histogram)]);
    }

    /// A histogram family: per sample the `_bucket` series, `_sum` and `_count`.
    pub fn histograms<'l, L: AsRef<[(&'l str, &'l str)]>>(
        &mut self,
        name: &str,
        help: &str,
        samples: &[(L, &Histogram)],
    ) {
        self.head(name, help, "histogram");
        for (labels, histogram) in samples {
            let labels = labels.as_ref();
            let (buckets, sum) = histogram.cumulative();
            let count = buckets.last().map(|b| b.1).unwrap_or(0);
            for (le, n) in buckets {
                let _ = write!(self.out, "{name}_bucket");
                write_labels(&mut self.out, labels, Some(le));
                let _ = writeln!(self.out, " {n}");
            }
            self.sample(&format!("{name}_sum"), labels, sum);
            self.sample(&format!("{name}_count"), labels, count as f64);
        }
    }
}

fn write_labels(out: &mut String, labels: Labels<'_>, le: Option<f64>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{k}=\"{}\"", escape_value(v));
    }
    if let Some(le) = le {
        if !labels.is_empty() {
            out.push(',');
        }
        let _ = write!(out, "le=\"{}\"", number(le));
    }
    out.push('}');
}

/// A sample value: integers without a fraction, `+Inf` as Prometheus spells it.
fn number(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn escape_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn text_format_as_prometheus_parses_it() {
        let mut e = Exposition::default();
        e.gauge("etcd_server_has_leader", "Whether a leader exists.", 1.0);
        e.gauges(
            "etcd_server_version",
            "Which version is running.",
            &[(&[("server_version", "3.4.0")], 1.0)],
        );
        e.counters(
            "kv_odd",
            "Label values with \"quotes\"\nand a \\ backslash.",
            &[(&[("name", "a\"b\\c\nd")], 7)],
        );
        let h = Histogram::new(&[0.5]);
        h.observe(Duration::from_millis(250));
        e.histograms("kv_took_seconds", "How long.", &[(&[("To", "ab")], &h)]);
        let text = e.finish();
        let expected = "\
# HELP etcd_server_has_leader Whether a leader exists.
# TYPE etcd_server_has_leader gauge
etcd_server_has_leader 1
# HELP etcd_server_version Which version is running.
# TYPE etcd_server_version gauge
etcd_server_version{server_version=\"3.4.0\"} 1
# HELP kv_odd Label values with \"quotes\"\\nand a \\\\ backslash.
# TYPE kv_odd counter
kv_odd{name=\"a\\\"b\\\\c\\nd\"} 7
# HELP kv_took_seconds How long.
# TYPE kv_took_seconds histogram
kv_took_seconds_bucket{To=\"ab\",le=\"0.5\"} 1
kv_took_seconds_bucket{To=\"ab\",le=\"+Inf\"} 1
kv_took_seconds_sum{To=\"ab\"} 0.25
kv_took_seconds_count{To=\"ab\"} 1
";
        assert_eq!(text, expected);
    }
}
