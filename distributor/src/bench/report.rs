//! The bench's arithmetic and outputs: the lower bound (Kumar & Ross), percentiles as
//! ratios to it, the CSV, and an SVG plot of the completion-time CDF.

use std::fmt::Write as _;
use std::path::Path;

/// `T_LB = max(S/U_seed, S/min d, N·S/(U_seed + Σu))` and its three terms, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LowerBound {
    pub t: f64,
    pub seed: f64,
    pub download: f64,
    pub aggregate: f64,
}

/// With every agent capped at `u` up and `d` down and the origin at `u_seed`.
pub fn lower_bound(size: u64, n: usize, u_seed: f64, u: f64, d: f64) -> LowerBound {
    let s = size as f64;
    let seed = s / u_seed;
    let download = s / d;
    let aggregate = n as f64 * s / (u_seed + n as f64 * u);
    LowerBound { t: seed.max(download).max(aggregate), seed, download, aggregate }
}

/// The `q` quantile (nearest rank) of `v`.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

pub fn print_row(label: &str, v: &[f64], t_lb: f64) {
    let (p50, p99, max) = (quantile(v, 0.5), quantile(v, 0.99), quantile(v, 1.0));
    println!(
        "{label}: p50 {p50:.2} s ({:.2}×T_LB), p99 {p99:.2} s ({:.2}×), max {max:.2} s ({:.2}×)",
        p50 / t_lb,
        p99 / t_lb,
        max / t_lb
    );
}

pub fn human(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1}GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1}MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1}KiB", n as f64 / 1024.0),
        n => format!("{n}B"),
    }
}

pub fn write_csv(path: &Path, p2p: &[f64], base: &[f64], t_lb: f64) -> std::io::Result<()> {
    let mut s = String::from("mode,seconds,ratio_to_t_lb\n");
    for (mode, v) in [("p2p", p2p), ("baseline", base)] {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        for t in v {
            let _ = writeln!(s, "{mode},{t:.4},{:.4}", t / t_lb);
        }
    }
    std::fs::write(path, s)
}

/// The CDF of completion times (x: multiples of T_LB, log-free), both modes, with a
/// vertical line at T_LB.
pub fn write_svg(path: &Path, p2p: &[f64], base: &[f64], t_lb: f64) -> std::io::Result<()> {
    let (w, h, m) = (640.0, 400.0, 50.0);
    let xmax = p2p.iter().chain(base).fold(1.5f64, |a, &t| a.max(t / t_lb)) * 1.05;
    let x = |r: f64| m + (w - 2.0 * m) * r / xmax;
    let y = |f: f64| h - m - (h - 2.0 * m) * f;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" \
         font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let _ = writeln!(s, "<line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>", y(0.0), w - m, y(0.0));
    let _ = writeln!(s, "<line x1=\"{m}\" y1=\"{}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>", y(0.0), y(1.0));
    let _ = writeln!(
        s,
        "<line x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{2}\" stroke=\"gray\" stroke-dasharray=\"4\"/>\
         <text x=\"{0}\" y=\"{3}\">T_LB</text>",
        x(1.0),
        y(0.0),
        y(1.0),
        y(1.0) - 5.0
    );
    let _ =
        writeln!(s, "<text x=\"{}\" y=\"{}\">completion time / T_LB (max {xmax:.1})</text>", w / 2.0 - 80.0, h - 15.0);
    let _ = writeln!(s, "<text x=\"5\" y=\"{}\">CDF</text>", m - 10.0);
    for (v, color, label, ly) in [(p2p, "#1f77b4", "mwdist (P2P)", 20.0), (base, "#d62728", "baseline (no P2P)", 36.0)]
    {
        if v.is_empty() {
            continue;
        }
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        let mut pts = format!("{},{}", x(0.0), y(0.0));
        for (i, t) in v.iter().enumerate() {
            let (f0, f1) = (i as f64 / v.len() as f64, (i + 1) as f64 / v.len() as f64);
            let _ = write!(pts, " {:.1},{:.1} {:.1},{:.1}", x(t / t_lb), y(f0), x(t / t_lb), y(f1));
        }
        let _ = writeln!(s, "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{pts}\"/>");
        let _ = writeln!(s, "<text x=\"{}\" y=\"{ly}\" fill=\"{color}\">{label}</text>", w - m - 120.0);
    }
    s.push_str("</svg>\n");
    std::fs::write(path, s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_bound_terms() {
        let mib = 1u64 << 20;
        let lb = lower_bound(16 * mib, 20, 4.0 * mib as f64, 4.0 * mib as f64, 4.0 * mib as f64);
        assert_eq!((lb.seed, lb.download), (4.0, 4.0));
        assert!((lb.aggregate - 320.0 / 84.0).abs() < 1e-9);
        assert_eq!(lb.t, 4.0);
        let lb = lower_bound(16 * mib, 100, 4.0 * mib as f64, 0.5 * mib as f64, 4.0 * mib as f64);
        assert_eq!(lb.t, lb.aggregate);
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!((quantile(&v, 0.5), quantile(&v, 0.99), quantile(&v, 1.0)), (50.0, 99.0, 100.0));
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn outputs_are_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_csv(&dir.path().join("c.csv"), &[1.0, 2.0], &[8.0], 1.0).expect("csv");
        write_svg(&dir.path().join("c.svg"), &[1.0, 2.0], &[8.0], 1.0).expect("svg");
        let csv = std::fs::read_to_string(dir.path().join("c.csv")).expect("read");
        assert_eq!(csv.lines().count(), 4);
        assert!(std::fs::read_to_string(dir.path().join("c.svg")).expect("read").contains("polyline"));
    }
}
