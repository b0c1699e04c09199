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

/// One agent of a faulty run, for [`fault_bounds`]: when it starts pulling, when it is
/// killed (if it is), and whether its uploads count (a peer serving corrupt pieces gives
/// the swarm nothing).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub start: f64,
    pub killed: Option<f64>,
    pub uploads: bool,
}

/// The lower bound recomputed for a run with late joiners, kills and bad peers: for each
/// agent that is not killed, `max(start + S/d, S/U_seed, T_agg)`, where `T_agg` is the
/// earliest time at which the upload that exists (the origin's, and each honest agent's
/// from its start until it is killed) could have carried `S` to every survivor. Fluid,
/// like [`lower_bound`]: it ignores that an agent can only upload what it already has.
/// `None` for the killed agents.
pub fn fault_bounds(size: u64, agents: &[Schedule], u_seed: f64, u: f64, d: f64) -> Vec<Option<f64>> {
    let s = size as f64;
    let survivors = agents.iter().filter(|a| a.killed.is_none()).count() as f64;
    let need = survivors * s;
    let carried = |t: f64| {
        u_seed * t
            + u * agents
                .iter()
                .filter(|a| a.uploads)
                .map(|a| (a.killed.unwrap_or(f64::INFINITY).min(t) - a.start).max(0.0))
                .sum::<f64>()
    };
    // `carried` grows without bound (the origin always uploads): bisect.
    let (mut lo, mut hi) = (0.0, s / u_seed * survivors.max(1.0));
    for _ in 0..100 {
        let mid = (lo + hi) / 2.0;
        if carried(mid) >= need {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let floor = hi.max(s / u_seed);
    agents.iter().map(|a| a.killed.is_none().then(|| (a.start + s / d).max(floor))).collect()
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

/// The survivors against their own bounds ([`fault_bounds`]), their first bytes and
/// their longest stalls.
pub fn print_faults(v: &[Completion], stall_limit: f64) {
    let ratios: Vec<f64> = v.iter().map(|c| c.seconds / c.bound).collect();
    let first: Vec<f64> = v.iter().map(|c| c.first_byte).collect();
    let stalls: Vec<f64> = v.iter().map(|c| c.stall).collect();
    let over = stalls.iter().filter(|s| **s > stall_limit).count();
    println!(
        "  against the bound recomputed for the faults: p50 {:.2}×, p99 {:.2}×, max {:.2}×; \
         clients' first byte after p50 {:.2} s, max {:.2} s; longest stall after it {:.2} s, \
         {over} clients over {stall_limit:.0} s",
        quantile(&ratios, 0.5),
        quantile(&ratios, 0.99),
        quantile(&ratios, 1.0),
        quantile(&first, 0.5),
        quantile(&first, 1.0),
        quantile(&stalls, 1.0),
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

/// One completed pull: seconds from the bench's start, the agent's own lower bound (see
/// [`fault_bounds`]; `T_LB` without faults), the wait for the first byte of the body, and
/// the longest time without a byte after it (and when it ended, from the bench's start).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Completion {
    pub seconds: f64,
    pub bound: f64,
    pub first_byte: f64,
    pub stall: f64,
    pub stall_end: f64,
}

pub fn write_csv(path: &Path, p2p: &[Completion], base: &[Completion], t_lb: f64) -> std::io::Result<()> {
    let mut s = String::from(
        "mode,seconds,ratio_to_t_lb,own_bound_seconds,ratio_to_own_bound,first_byte_seconds,longest_stall_seconds,\
         longest_stall_ended_at\n",
    );
    for (mode, v) in [("p2p", p2p), ("baseline", base)] {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
        for c in v {
            let _ = writeln!(
                s,
                "{mode},{:.4},{:.4},{:.4},{:.4},{:.4},{:.4},{:.4}",
                c.seconds,
                c.seconds / t_lb,
                c.bound,
                c.seconds / c.bound,
                c.first_byte,
                c.stall,
                c.stall_end
            );
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
    fn fault_bounds_follow_the_schedule() {
        let mib = 1u64 << 20;
        let r = mib as f64;
        let on = |start| Schedule { start, killed: None, uploads: true };
        // No faults: the plain bound for everyone.
        let plain: Vec<Schedule> = (0..100).map(|_| on(0.0)).collect();
        let lb = lower_bound(32 * mib, 100, r, r, r);
        for b in fault_bounds(32 * mib, &plain, r, r, r) {
            assert!(b.is_some_and(|b| (b - lb.t).abs() < 1e-6), "{b:?} vs {}", lb.t);
        }
        // A late joiner cannot finish before its start plus S/d.
        let mut v = plain.clone();
        v[0] = on(16.0);
        let b: Vec<f64> = fault_bounds(32 * mib, &v, r, r, r).into_iter().flatten().collect();
        assert!((b[0] - 48.0).abs() < 1e-6 && (b[1] - 32.0).abs() < 1e-6, "{b:?}");
        // Upload-bound: 10 agents capped at a quarter of their download. Killing half of
        // them early leaves less upload for the survivors: the aggregate term grows.
        let few: Vec<Schedule> = (0..10).map(|_| on(0.0)).collect();
        let agg = lower_bound(8 * mib, 10, r, r / 4.0, r).aggregate;
        let b = fault_bounds(8 * mib, &few, r, r / 4.0, r);
        assert!(b[0].is_some_and(|b| (b - agg).abs() < 1e-6), "{b:?} vs {agg}");
        let mut killed = few.clone();
        for a in &mut killed[5..] {
            a.killed = Some(1.0);
        }
        let k = fault_bounds(8 * mib, &killed, r, r / 4.0, r);
        assert!(k[5..].iter().all(Option::is_none), "bounds only for survivors: {k:?}");
        // 5 survivors need 40 MiB: 1·T + 5·T/4 + 5·1/4 = 40  =>  T = 38.75 / 2.25.
        assert!(k[0].is_some_and(|b| (b - 38.75 / 2.25).abs() < 1e-6), "{k:?}");
        // A bad peer's upload is worth nothing.
        let mut bad = few.clone();
        bad[0].uploads = false;
        assert!(fault_bounds(8 * mib, &bad, r, r / 4.0, r)[0].is_some_and(|b| b > agg + 0.1));
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
        let c = |seconds| Completion { seconds, bound: 1.0, first_byte: 0.2, stall: 0.1, stall_end: 0.5 };
        write_csv(&dir.path().join("c.csv"), &[c(1.0), c(2.0)], &[c(8.0)], 1.0).expect("csv");
        write_svg(&dir.path().join("c.svg"), &[1.0, 2.0], &[8.0], 1.0).expect("svg");
        let csv = std::fs::read_to_string(dir.path().join("c.csv")).expect("read");
        assert_eq!(csv.lines().count(), 4);
        assert!(std::fs::read_to_string(dir.path().join("c.svg")).expect("read").contains("polyline"));
    }
}
