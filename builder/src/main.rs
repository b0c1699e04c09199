//! `mwbuild` command line: parse arguments, run the library, print the error chain.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use mwbuild::build::{build, BuildOptions};
use mwbuild::spec::{explain, Spec};
use oci_core::reference::ImageRef;
use oci_core::registry::ClientOptions;
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "mwbuild", version, about = "Build reproducible, per-component OCI images of MediaWiki versions")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Debug, Clone)]
struct RegistryArgs {
    /// Allow plain HTTP and unverified TLS for non-loopback registries.
    #[arg(long, global = true)]
    insecure: bool,
    /// docker config.json holding registry credentials.
    #[arg(long, global = true, env = "REGISTRY_AUTH_FILE")]
    authfile: Option<PathBuf>,
}

impl RegistryArgs {
    fn options(&self) -> ClientOptions {
        ClientOptions { insecure: self.insecure, auth_file: self.authfile.clone(), ..ClientOptions::default() }
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Build one image per version and the aggregate multi-version image.
    Build(BuildArgs),
    /// Document the build spec's fields (all, or one and its children).
    Explain { field: Option<String> },
    /// Show an image's layers, sizes, components and which tags share them.
    Inspect {
        image: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// List files added, removed and changed per version between two images, from their
    /// tables of contents (no layer is downloaded).
    Diff {
        image_a: String,
        image_b: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Remove from the build cache what no build used within --keep-days (what the last
    /// build of each tree made is always kept).
    Prune {
        /// Build cache directory (default: ~/.cache/mwbuild).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Keep what was used within this many days.
        #[arg(long, default_value_t = 14)]
        keep_days: u64,
        /// Only report what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Swap the base layers under an image without touching the MediaWiki layers.
    Rebase {
        image: String,
        #[arg(long)]
        onto: String,
        /// Where to write the result (default: the same reference).
        #[arg(long)]
        output: Option<String>,
        #[command(flatten)]
        registry: RegistryArgs,
    },
}

#[derive(Args, Debug)]
struct BuildArgs {
    /// The build spec (TOML).
    spec: PathBuf,
    /// Where the images go: oci:<dir> or docker://<host>/<repo>.
    #[arg(long, default_value = "oci:out")]
    output: String,
    /// Build cache directory (default: ~/.cache/mwbuild).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Compression threads (default: number of CPUs).
    #[arg(long)]
    jobs: Option<usize>,
    /// No progress bars and no summary table.
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    registry: RegistryArgs,
}

fn parse_ref(s: &str) -> Result<ImageRef> {
    s.parse::<ImageRef>().with_context(|| format!("invalid image reference {s:?}"))
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Explain { field } => {
            print!("{}", explain(field.as_deref()).map_err(anyhow::Error::msg)?);
        }
        Cmd::Build(a) => {
            let spec = Spec::load(&a.spec)?;
            let output = parse_ref(&a.output)?;
            if output.reference().is_some() {
                anyhow::bail!("--output {} must not carry a tag: tags come from the version names", a.output);
            }
            let jobs = a.jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
            let opts = BuildOptions {
                output,
                cache_dir: a.cache_dir.unwrap_or_else(mwbuild::cache::Cache::default_dir),
                jobs,
                registry: a.registry.options(),
                progress: !a.quiet && std::io::stderr().is_terminal(),
                now: None,
            };
            let report = build(&spec, &opts).await?;
            if let Some(path) = &a.report {
                let text = serde_json::to_string_pretty(&report.to_json())?;
                std::fs::write(path, text).with_context(|| format!("cannot write report {}", path.display()))?;
            }
            if !a.quiet {
                print!("{}", report.summary());
            }
        }
        Cmd::Prune { cache_dir, keep_days, dry_run } => {
            let dir = cache_dir.unwrap_or_else(mwbuild::cache::Cache::default_dir);
            let keep = std::time::Duration::from_secs(keep_days.saturating_mul(86_400));
            let r = mwbuild::prune::prune(&dir, keep, dry_run)?;
            print!("{}", r.summary(dry_run));
        }
        Cmd::Inspect { image, registry } => {
            let r = parse_ref(&image)?;
            print!("{}", mwbuild::inspect::inspect(&r, &registry.options()).await?);
        }
        Cmd::Diff { image_a, image_b, registry } => {
            let (a, b) = (parse_ref(&image_a)?, parse_ref(&image_b)?);
            let d = mwbuild::inspect::diff(&a, &b, &registry.options()).await?;
            print!("{}", d.render());
        }
        Cmd::Rebase { image, onto, output, registry } => {
            let r = parse_ref(&image)?;
            let onto = parse_ref(&onto)?;
            let out = match output {
                Some(o) => parse_ref(&o)?,
                None => r.clone(),
            };
            let d = mwbuild::rebase::rebase(&r, &onto, &out, &registry.options()).await?;
            println!("{out} {d}");
        }
    }
    Ok(())
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    // One multi-threaded runtime for registry I/O; CPU work runs on rayon pools and
    // blocking threads started from it.
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mwbuild: cannot start the async runtime: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        if e.chain()
            .any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
        {
            std::process::exit(0);
        }
        eprintln!("mwbuild: error: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_build_arguments() {
        let cli = Cli::try_parse_from(["mwbuild", "build", "s.toml", "--output", "oci:x", "--jobs", "3", "--quiet"])
            .expect("parse");
        match cli.cmd {
            Cmd::Build(a) => {
                assert_eq!(a.jobs, Some(3));
                assert!(a.quiet);
                assert_eq!(a.output, "oci:x");
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["mwbuild", "rebase", "oci:x:a"]).is_err(), "--onto is required");
    }
}
