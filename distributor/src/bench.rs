//! `mwdist bench`: an origin and N agents on 127.0.0.1 as separate processes, every one
//! capped at the same rate R up and down; N pulls through the agents' mirror APIs started
//! together; completion times reported as ratios to the physical lower bound T_LB
//! (see `report`), origin egress as a multiple of S, and — in the same run — the no-P2P
//! baseline (N clients pulling from the origin under the same caps).

pub mod report;

use crate::limit::RateLimiter;
use crate::pieces::Geometry;
use anyhow::Context as _;
use oci_core::Digest;
use rand::{RngCore as _, SeedableRng as _};
use sha2::{Digest as _, Sha256};
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use report::{lower_bound, LowerBound};
use report::{Completion, Schedule};

/// A client stream that received nothing for longer than this is a stall.
const STALL: f64 = 2.0;

/// One pull as the bench's client saw it.
struct Pulled {
    /// Seconds from the bench's start to the last byte.
    done: f64,
    digest: Digest,
    /// Seconds from the request to the first byte of the body.
    first_byte: f64,
    /// The longest time without a byte after the first one, and when (seconds from the
    /// bench's start) it ended.
    stall: f64,
    stall_end: f64,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[arg(long, default_value_t = 20)]
    pub agents: usize,
    #[arg(long, default_value = "16MiB", value_parser = crate::cli::parse_size)]
    pub blob_size: u64,
    /// Upload and download cap of every agent and of the origin (bytes/s).
    #[arg(long, default_value = "4MiB", value_parser = crate::cli::parse_size)]
    pub rate: u64,
    /// Fraction of agents killed at 30 % of T_LB, and as many again at 60 % (they are not
    /// counted; the survivors are also compared with the bound recomputed for the faults).
    #[arg(long, default_value_t = 0.0)]
    pub kill: f64,
    /// Fraction of agents that start their pull at T_LB/2.
    #[arg(long, default_value_t = 0.0)]
    pub late: f64,
    /// Agents that serve corrupted pieces to peers (their own pulls are counted).
    #[arg(long, default_value_t = 0)]
    pub bad_peers: usize,
    /// Skip the no-P2P baseline (it takes about N·S/R).
    #[arg(long)]
    pub no_baseline: bool,
    /// Where to write `completion.csv` and `cdf.svg` (and the work files).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// A child `mwdist` process, killed on drop.
struct Child2 {
    child: Child,
    line: String,
}

impl Child2 {
    fn start(args: &[String], secret: &str) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut cmd = if Path::new("/usr/bin/setpriv").exists() {
            let mut c = Command::new("/usr/bin/setpriv");
            c.args(["--pdeathsig", "KILL", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args).env("MWDIST_SECRET", secret).stdin(Stdio::null()).stdout(Stdio::piped());
        // Bad peers and killed agents make the others warn; keep the report readable.
        cmd.env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()));
        let mut child = cmd.spawn().with_context(|| format!("starting {}", exe.display()))?;
        let out = child.stdout.take().context("child stdout")?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        anyhow::ensure!(!line.is_empty(), "mwdist {args:?} exited before it was ready");
        Ok(Child2 { child, line })
    }

    fn field(&self, key: &str) -> anyhow::Result<String> {
        let p = format!("{key}=");
        self.line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(p.as_str()))
            .map(str::to_string)
            .with_context(|| format!("no {key} in {:?}", self.line))
    }

    /// Peak resident set (VmHWM) in bytes.
    fn peak_rss(&self) -> Option<u64> {
        // setpriv execs mwdist in place, so the pid is mwdist's.
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kb: u64 =
            s.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Child2 {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Write `size` bytes of seeded noise as a blob of a new layout; its digest.
fn make_blob(dir: &Path, size: u64) -> anyhow::Result<Digest> {
    let layout = oci_core::layout::Layout::create(dir.to_path_buf())?;
    let tmp = dir.join("blob.tmp");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(size);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        h.update(&buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    drop(f);
    let d = Digest::from_sha256(h.finalize().into());
    layout.put_verified_blob_file(&tmp, &d, size)?;
    std::fs::remove_file(&tmp)?;
    Ok(d)
}

/// GET a blob, reading it under an optional download cap; hashes it, and times the
/// longest wait for a byte.
async fn pull(
    http: reqwest::Client,
    url: String,
    auth: Option<String>,
    cap: Option<u64>,
    start: Instant,
) -> anyhow::Result<Pulled> {
    let lim = RateLimiter::new(cap);
    let mut req = http.get(&url);
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let asked = Instant::now();
    let (mut first_byte, mut last) = (None, asked);
    let (mut stall, mut stall_end) = (0f64, 0f64);
    let mut resp = req.send().await?.error_for_status()?;
    let mut h = Sha256::new();
    while let Some(c) = resp.chunk().await? {
        match first_byte {
            None => first_byte = Some(asked.elapsed().as_secs_f64()),
            Some(_) if last.elapsed().as_secs_f64() > stall => {
                (stall, stall_end) = (last.elapsed().as_secs_f64(), start.elapsed().as_secs_f64());
            }
            Some(_) => {}
        }
        lim.acquire(c.len()).await;
        h.update(&c);
        last = Instant::now();
    }
    Ok(Pulled {
        done: start.elapsed().as_secs_f64(),
        digest: Digest::from_sha256(h.finalize().into()),
        first_byte: first_byte.unwrap_or_else(|| asked.elapsed().as_secs_f64()),
        stall,
        stall_end,
    })
}

async fn metric(http: &reqwest::Client, addr: &str, name: &str) -> u64 {
    let Ok(resp) = http.get(format!("http://{addr}/metrics")).send().await else { return 0 };
    let text = resp.text().await.unwrap_or_default();
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.trim().parse().ok())).unwrap_or(0)
}

/// Every [`SAMPLE_EVERY`]: seconds since the start, origin egress and the agents' total
/// download (bytes), read from their metrics.
type Timeline = Vec<(f64, u64, u64)>;
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

async fn sample_utilisation(
    http: reqwest::Client,
    origin: String,
    peers: Vec<String>,
    start: Instant,
    out: std::sync::Arc<std::sync::Mutex<Timeline>>,
) {
    let mut next = tokio::time::Instant::now();
    // A killed agent's counters stay at their last value.
    let mut last = vec![0u64; peers.len()];
    loop {
        // All at once, stamped with the middle of the round, so that a loaded machine
        // does not smear a sample over seconds.
        let before = start.elapsed().as_secs_f64();
        let up = metric(&http, &origin, "mwdist_bytes_up_total{to=\"peers\"}");
        let down = futures_util::future::join_all(peers.iter().map(|p| {
            let http = &http;
            async move {
                metric(http, p, "mwdist_bytes_down_total{source=\"peers\"}").await
                    + metric(http, p, "mwdist_bytes_down_total{source=\"origin\"}").await
            }
        }));
        let (up, down) = tokio::join!(up, down);
        let at = (before + start.elapsed().as_secs_f64()) / 2.0;
        last.iter_mut().zip(down).for_each(|(l, d)| *l = (*l).max(d));
        out.lock().unwrap_or_else(|p| p.into_inner()).push((at, up, last.iter().sum()));
        next = (next + SAMPLE_EVERY).max(tokio::time::Instant::now());
        tokio::time::sleep_until(next).await;
    }
}

/// One line: the origin's upload and the agents' mean download, as fractions of the cap,
/// per sampling interval (idle links are where time is lost).
fn print_utilisation(t: &Timeline, rate: u64, n: usize) {
    let cells: Vec<String> = t
        .windows(2)
        .map(|w| {
            let dt = (w[1].0 - w[0].0).max(1e-3);
            let up = (w[1].1.saturating_sub(w[0].1)) as f64 / dt / rate as f64;
            let down = (w[1].2.saturating_sub(w[0].2)) as f64 / dt / rate as f64 / n as f64;
            format!("{:.0}s:{:.0}/{:.0}", w[1].0, up * 100.0, down * 100.0)
        })
        .collect();
    println!("  utilisation % (origin up / mean agent down): {}", cells.join(" "));
}

pub async fn run(a: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.agents > 0 && a.blob_size > 0 && a.rate > 0, "agents, blob size and rate must be positive");
    let (n_kill, n_late) = ((a.agents as f64 * a.kill).round() as usize, (a.agents as f64 * a.late).round() as usize);
    anyhow::ensure!(
        (0.0..=1.0).contains(&a.kill) && (0.0..=1.0).contains(&a.late) && 2 * n_kill + n_late < a.agents,
        "--kill {} (killed twice over) and --late {} leave no agent that starts on time and survives; \
         lower them",
        a.kill,
        a.late
    );
    anyhow::ensure!(a.bad_peers < a.agents - 2 * n_kill, "--bad-peers {}: more bad peers than survivors", a.bad_peers);
    let tmp = tempfile::Builder::new().prefix("mwdist-bench-").tempdir()?;
    let out = a.out.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&out)?;
    let (n, s, r) = (a.agents, a.blob_size, a.rate);
    let secret = format!("{:032x}", rand::random::<u128>());
    let d = make_blob(&tmp.path().join("upstream"), s)?;
    let lb = lower_bound(s, n, r as f64, r as f64, r as f64);
    let g = Geometry::for_size(s);
    println!(
        "mwdist bench: N={n} S={} R={}/s, {} pieces of {}",
        report::human(s),
        report::human(r),
        g.count(),
        report::human(g.piece_size)
    );
    println!(
        "T_LB = {:.2} s = max(S/U_seed {:.2} s, S/min d {:.2} s, N·S/(U_seed+Σu) {:.2} s)",
        lb.t, lb.seed, lb.download, lb.aggregate
    );
    let rate = r.to_string();
    let origin = Child2::start(
        &[
            "origin".into(),
            "--upstream".into(),
            format!("oci:{}", tmp.path().join("upstream").display()),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--cache-dir".into(),
            tmp.path().join("origin").display().to_string(),
            "--rate-up".into(),
            rate.clone(),
        ],
        &secret,
    )?;
    let origin_addr = origin.field("listening")?;
    let mut agents = Vec::with_capacity(n);
    for i in 0..n {
        let mut args: Vec<String> = [
            "agent",
            "--origin",
            &origin_addr,
            "--listen",
            "127.0.0.1:0",
            "--peer-listen",
            "127.0.0.1:0",
            "--rate-up",
            &rate,
            "--rate-down",
            &rate,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(["--data-dir".into(), tmp.path().join(format!("agent{i}")).display().to_string()]);
        if i < a.bad_peers {
            args.push("--corrupt".into());
        }
        agents.push(Child2::start(&args, &secret)?);
    }
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build()?;
    // Killed agents are the last ones (the very last at 60 %, the ones before at 30 %),
    // late ones just before them, bad peers first.
    let (first_kill, second_kill) = (lb.t * 0.3, lb.t * 0.6);
    let killed: Vec<usize> = (n - 2 * n_kill..n).collect();
    let late: Vec<usize> = (n - 2 * n_kill - n_late..n - 2 * n_kill).collect();
    let schedule: Vec<Schedule> = (0..n)
        .map(|i| Schedule {
            start: if late.contains(&i) { lb.t / 2.0 } else { 0.0 },
            killed: match i {
                i if i >= n - n_kill => Some(second_kill),
                i if i >= n - 2 * n_kill => Some(first_kill),
                _ => None,
            },
            uploads: i >= a.bad_peers,
        })
        .collect();
    let bounds = report::fault_bounds(s, &schedule, r as f64, r as f64, r as f64);
    let start = Instant::now();
    let half = Duration::from_secs_f64(lb.t / 2.0);
    let mut tasks = Vec::new();
    for (i, ag) in agents.iter().enumerate() {
        let url = format!("http://{}/v2/bench/blobs/{d}", ag.field("mirror")?);
        let (http, delay) = (http.clone(), if late.contains(&i) { half } else { Duration::ZERO });
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            pull(http, url, None, None, start).await
        }));
    }
    let timeline: std::sync::Arc<std::sync::Mutex<Timeline>> = Default::default();
    let sampler = tokio::spawn(sample_utilisation(
        reqwest::Client::new(),
        origin_addr.clone(),
        agents.iter().filter_map(|a| a.field("peer").ok()).collect(),
        start,
        timeline.clone(),
    ));
    if n_kill > 0 {
        for (at, range) in [(first_kill, n - 2 * n_kill..n - n_kill), (second_kill, n - n_kill..n)] {
            tokio::time::sleep_until(tokio::time::Instant::from_std(start + Duration::from_secs_f64(at))).await;
            for i in range {
                agents[i].kill();
            }
        }
    }
    let mut times = Vec::new();
    let mut failures = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await? {
            Ok(p) if p.digest == d => {
                if !killed.contains(&i) {
                    times.push((i, p));
                }
            }
            Ok(p) => anyhow::bail!("agent {i} delivered wrong bytes ({})", p.digest),
            Err(e) if killed.contains(&i) => tracing::debug!("killed agent {i}: {e:#}"),
            Err(e) => {
                failures += 1;
                eprintln!("agent {i}: {e:#}");
            }
        }
    }
    sampler.abort();
    let timeline = timeline.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let egress = metric(&http, &origin_addr, "mwdist_bytes_up_total{to=\"peers\"}").await;
    let rss = agents.iter().filter_map(Child2::peak_rss).max().unwrap_or(0);
    let (mut rejected, mut busy, mut replans) = (0, 0, 0);
    for (i, ag) in agents.iter().enumerate() {
        if !killed.contains(&i) {
            rejected += metric(&http, &ag.field("peer")?, "mwdist_pieces_rejected_total").await;
            busy += metric(&http, &ag.field("peer")?, "mwdist_piece_requests_busy_total").await;
            replans += metric(&http, &ag.field("peer")?, "mwdist_watchdog_replans_total").await;
        }
    }
    drop(agents);
    let p2p: Vec<Completion> = times
        .iter()
        .map(|(i, p)| Completion {
            seconds: p.done,
            bound: bounds[*i].unwrap_or(lb.t),
            first_byte: p.first_byte,
            stall: p.stall,
            stall_end: p.stall_end,
        })
        .collect();
    let seconds = |v: &[Completion]| v.iter().map(|c| c.seconds).collect::<Vec<f64>>();
    report::print_row("p2p", &seconds(&p2p), lb.t);
    println!(
        "  survivors {} of {n} completed with verified bytes, {failures} failed; pieces rejected {rejected}; \
         origin egress {:.3}×S; agent peak RSS {}; piece requests refused busy {busy}; \
         transfers with no byte for 2 s (watchdog re-plans) {replans}",
        p2p.len(),
        egress as f64 / s as f64,
        report::human(rss)
    );
    report::print_faults(&p2p, STALL);
    print_utilisation(&timeline, r, n);
    let mut base = Vec::new();
    if !a.no_baseline {
        let start = Instant::now();
        let url = format!("http://{origin_addr}/v2/bench/blobs/{d}");
        let tasks: Vec<_> = (0..n)
            .map(|_| tokio::spawn(pull(http.clone(), url.clone(), Some(format!("Bearer {secret}")), Some(r), start)))
            .collect();
        for t in tasks {
            let p = t.await??;
            anyhow::ensure!(p.digest == d, "baseline delivered wrong bytes");
            base.push(Completion {
                seconds: p.done,
                bound: lb.t,
                first_byte: p.first_byte,
                stall: p.stall,
                stall_end: p.stall_end,
            });
        }
        report::print_row("baseline (no P2P)", &seconds(&base), lb.t);
    }
    report::write_csv(&out.join("completion.csv"), &p2p, &base, lb.t)?;
    report::write_svg(&out.join("cdf.svg"), &seconds(&p2p), &seconds(&base), lb.t)?;
    if a.out.is_some() {
        println!("wrote {} and {}", out.join("completion.csv").display(), out.join("cdf.svg").display());
    }
    drop(origin);
    anyhow::ensure!(failures == 0, "{failures} surviving agents did not complete");
    Ok(())
}
