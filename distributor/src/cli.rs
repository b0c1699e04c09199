//! Command-line interface: one options struct per subcommand, and what each runs.

use crate::agent::{Agent, AgentOptions};
use crate::auth::Secret;
use crate::origin::{Origin, OriginOptions};
use crate::upstream::Upstream;
use clap::{Args, Parser, Subcommand};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "mwdist", version, about = "Peer-to-peer fan-out of OCI blobs behind a registry mirror")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The seed: reads upstream once, serves pieces, hosts the tracker.
    Origin(OriginArgs),
    /// One per worker: a registry mirror on loopback, fed by the swarm.
    Agent(AgentArgs),
    /// Preheat every blob of an image (or index) into an agent.
    Pull(PullArgs),
    /// Fan-out benchmark against the physical lower bound and the no-P2P baseline.
    Bench(crate::bench::BenchArgs),
    /// Keep a blob in an agent's cache whatever the disk bound.
    Pin(PinArgs),
    /// Undo `pin`.
    Unpin(PinArgs),
    /// A tracker alone, shared by several origins (`mwdist origin --tracker`).
    Tracker(TrackerArgs),
    /// Discrete-event simulation of 1,000–10,000 nodes with the agent's selection code.
    Simulate(crate::sim::SimArgs),
}

/// The cluster secret: `MWDIST_SECRET`, or the first line of `--secret-file`.
#[derive(Debug, Args, Clone)]
pub struct SecretArgs {
    #[arg(long, env = "MWDIST_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
}

impl SecretArgs {
    pub fn load(&self) -> anyhow::Result<Secret> {
        if let Some(p) = &self.secret_file {
            let s = std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))?;
            return Secret::new(s.lines().next().unwrap_or("").trim());
        }
        match std::env::var("MWDIST_SECRET") {
            Ok(s) => Secret::new(s.trim()),
            Err(_) => anyhow::bail!("set the cluster secret with MWDIST_SECRET or --secret-file"),
        }
    }
}

#[derive(Debug, Args)]
pub struct OriginArgs {
    /// `docker://host[/repo]` or `oci:<dir>`.
    #[arg(long, env = "MWDIST_UPSTREAM")]
    pub upstream: String,
    #[arg(long, env = "MWDIST_LISTEN", default_value = "0.0.0.0:7070")]
    pub listen: SocketAddr,
    #[arg(long, env = "MWDIST_CACHE_DIR", default_value = "/var/cache/mwdist/origin")]
    pub cache_dir: PathBuf,
    /// Upload cap (bytes/s, suffixes K M G for KiB MiB GiB).
    #[arg(long, value_parser = parse_size)]
    pub rate_up: Option<u64>,
    /// Registry auth file (docker `config.json`) for the upstream.
    #[arg(long)]
    pub auth_file: Option<PathBuf>,
    /// Requests handled at once; more are refused at once with 503 and `Retry-After`.
    /// Open connections are capped at 4 times as many, at least 64 (more are closed at once).
    #[arg(long, env = "MWDIST_MAX_REQUESTS", default_value_t = crate::cap::ORIGIN_MAX_REQUESTS)]
    pub max_requests: usize,
    /// Disk bound for complete blobs in the cache; least-recently-used ones not being
    /// served are evicted.
    #[arg(long, env = "MWDIST_CACHE_MAX", value_parser = parse_size)]
    pub cache_max: Option<u64>,
    /// Use this tracker (`host:port`: another origin, or `mwdist tracker`) instead of
    /// this origin's own; announcements sent here are forwarded to it.
    #[arg(long, env = "MWDIST_TRACKER")]
    pub tracker: Option<String>,
    #[command(flatten)]
    pub secret: SecretArgs,
}

#[derive(Debug, Args)]
pub struct TrackerArgs {
    #[arg(long, env = "MWDIST_LISTEN", default_value = "0.0.0.0:7072")]
    pub listen: SocketAddr,
    /// Requests handled at once; more are refused at once with 503 and `Retry-After`.
    /// Open connections are capped at 4 times as many, at least 64 (more are closed at once).
    #[arg(long, env = "MWDIST_MAX_REQUESTS", default_value_t = crate::cap::ORIGIN_MAX_REQUESTS)]
    pub max_requests: usize,
    #[command(flatten)]
    pub secret: SecretArgs,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The origin/tracker, `host:port`.
    #[arg(long, env = "MWDIST_ORIGIN")]
    pub origin: String,
    /// Announce to this tracker (`host:port`) instead of the origin's.
    #[arg(long, env = "MWDIST_TRACKER")]
    pub tracker: Option<String>,
    #[arg(long, env = "MWDIST_MIRROR_LISTEN", default_value = "127.0.0.1:5050")]
    pub listen: SocketAddr,
    #[arg(long, env = "MWDIST_PEER_LISTEN", default_value = "0.0.0.0:7071")]
    pub peer_listen: SocketAddr,
    /// How other agents reach this one (`host:port`); default: the peer address.
    #[arg(long, env = "MWDIST_ADVERTISE")]
    pub advertise: Option<String>,
    #[arg(long, env = "MWDIST_DATA_DIR", default_value = "/var/lib/mwdist")]
    pub data_dir: PathBuf,
    #[arg(long, value_parser = parse_size)]
    pub rate_up: Option<u64>,
    #[arg(long, value_parser = parse_size)]
    pub rate_down: Option<u64>,
    /// Disk bound for complete blobs; least-recently-used unpinned ones are evicted.
    #[arg(long, env = "MWDIST_CACHE_MAX", value_parser = parse_size)]
    pub cache_max: Option<u64>,
    /// Requests the peer port handles at once; more are refused at once with 503 and
    /// `Retry-After`, and the requester asks another peer. Open connections are capped at
    /// 4 times as many, at least 64 (more are closed at once).
    #[arg(long, env = "MWDIST_MAX_REQUESTS", default_value_t = crate::cap::AGENT_MAX_REQUESTS)]
    pub max_requests: usize,
    /// Testing only: serve corrupted pieces to peers.
    #[arg(long, hide = true)]
    pub corrupt: bool,
    #[command(flatten)]
    pub secret: SecretArgs,
}

#[derive(Debug, Args)]
pub struct PinArgs {
    pub digest: oci_core::Digest,
    /// The agent's data directory (the pin list is `<data-dir>/pins`).
    #[arg(long, env = "MWDIST_DATA_DIR", default_value = "/var/lib/mwdist")]
    pub data_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// `name:tag` or `name@sha256:…` as the agent's mirror knows it.
    pub image: String,
    /// The agent's mirror address.
    #[arg(long, default_value = "127.0.0.1:5050")]
    pub agent: String,
}

/// `16MiB`, `4M`, `512k`, `100`: bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let mul = match unit.to_ascii_lowercase().trim_end_matches("/s").trim_end_matches('b').trim_end_matches('i') {
        "" => 1u64,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        _ => return Err(format!("{s:?}: unknown unit (use K, M or G)")),
    };
    Ok((n * mul as f64) as u64)
}

/// Print a line for whoever started us (tests and `bench` read it), then flush.
fn ready(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Origin(a) => {
            let client = oci_core::registry::ClientOptions { auth_file: a.auth_file, ..Default::default() };
            let opts = OriginOptions {
                listen: a.listen,
                upstream: Upstream::parse(&a.upstream, &client)?,
                cache_dir: a.cache_dir,
                secret: a.secret.load()?,
                rate_up: a.rate_up,
                max_requests: a.max_requests,
                cache_max: a.cache_max,
                tracker: a.tracker,
            };
            let (_o, running) = Origin::serve(&opts).await?;
            ready(&format!("mwdist origin listening={}", running.addr));
            running.wait().await;
            Ok(())
        }
        Command::Agent(a) => {
            let opts = AgentOptions {
                mirror_listen: a.listen,
                peer_listen: a.peer_listen,
                advertise: a.advertise,
                origin: a.origin,
                tracker: a.tracker,
                data_dir: a.data_dir,
                secret: a.secret.load()?,
                rate_up: a.rate_up,
                rate_down: a.rate_down,
                cache_max: a.cache_max,
                max_requests: a.max_requests,
                corrupt: a.corrupt,
            };
            let running = Agent::start(opts).await?;
            ready(&format!("mwdist agent mirror={} peer={}", running.mirror.addr, running.peer.addr));
            running.wait().await;
            Ok(())
        }
        Command::Tracker(t) => {
            let metrics = std::sync::Arc::new(crate::metrics::Metrics::default());
            let router = crate::tracker::standalone_router(t.secret.load()?, t.max_requests, metrics.clone());
            let running = crate::server::Running::bind(t.listen, router, "tracker", t.max_requests, metrics).await?;
            ready(&format!("mwdist tracker listening={}", running.addr));
            running.wait().await;
            Ok(())
        }
        Command::Pin(p) => {
            crate::agent::cache::set_pin(&p.data_dir, &p.digest, true)?;
            Ok(())
        }
        Command::Unpin(p) => {
            crate::agent::cache::set_pin(&p.data_dir, &p.digest, false)?;
            Ok(())
        }
        Command::Pull(p) => crate::pull::preheat(&p.agent, &p.image).await,
        Command::Bench(b) => crate::bench::run(b).await,
        Command::Simulate(s) => crate::sim::run(&s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        for (s, n) in [("100", 100), ("4M", 4 << 20), ("16MiB", 16 << 20), ("512k", 512 << 10), ("1.5G", 3 << 29)] {
            assert_eq!(parse_size(s), Ok(n), "{s}");
        }
        assert!(parse_size("4X").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn arguments_parse() {
        let c = Cli::try_parse_from(["mwdist", "agent", "--origin", "o:1", "--rate-up", "4MiB"]).expect("valid");
        let Command::Agent(a) = c.command else { panic!("not agent") };
        assert_eq!(a.rate_up, Some(4 << 20));
        assert_eq!(a.listen.ip().to_string(), "127.0.0.1", "the mirror binds loopback by default");
        assert_eq!(a.max_requests, crate::cap::AGENT_MAX_REQUESTS);
        assert!(Cli::try_parse_from(["mwdist", "origin"]).is_err(), "upstream is required");
        let c = Cli::try_parse_from([
            "mwdist",
            "origin",
            "--upstream",
            "oci:/x",
            "--cache-max",
            "2G",
            "--tracker",
            "t:7072",
            "--max-requests",
            "9",
        ])
        .expect("valid");
        let Command::Origin(o) = c.command else { panic!("not origin") };
        assert_eq!((o.cache_max, o.tracker.as_deref(), o.max_requests), (Some(2 << 30), Some("t:7072"), 9));
        let c = Cli::try_parse_from(["mwdist", "tracker"]).expect("valid");
        let Command::Tracker(t) = c.command else { panic!("not tracker") };
        assert_eq!(t.listen.port(), 7072);
    }
}
