//! Command-line arguments (clap derive: one struct per subcommand, shared groups
//! flattened) and their translation into engine options; the human and JSON output.

use crate::blob::Limits;
use crate::engine::{self, ApplyOptions, ImageOptions, Summary};
use crate::error::{Error, Result};
use crate::path;
use crate::plan::{ModePolicy, Modes};
use crate::verify::{self, VerifyOptions};
use crate::view::SymlinkPolicy;
use clap::{Args, Parser, Subcommand};
use oci_core::registry::ClientOptions;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(name = "scap-bridge", version, about = "Lay a MediaWiki version from an OCI image into scap's staging tree")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Print the summary as JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// Print nothing but errors (and, for verify, the differences).
    #[arg(long, short, global = true)]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make <staging>/php-<version> equal to the image's /srv/mediawiki/php-<version>.
    Prep(PrepArgs),
    /// Unpack an image (or a subtree of it) into DIR, replacing what DIR held, atomically.
    Unpack(UnpackArgs),
    /// List every difference between DIR and the image; exit status 1 if there is any.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
pub struct ImageArgs {
    /// oci:<dir>[:<tag>|@<digest>] or docker://<host>/<repo>[:<tag>|@<digest>]
    pub image: String,
    /// Platform to take from an image index.
    #[arg(long, default_value = "linux/amd64")]
    pub platform: String,
    /// Where scap-bridge keeps its own state (default $XDG_STATE_HOME/scap-bridge).
    #[arg(long, env = "SCAP_BRIDGE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// docker/podman auth file for registries.
    #[arg(long)]
    pub auth_file: Option<PathBuf>,
    /// Plain HTTP to a registry that is not on loopback.
    #[arg(long)]
    pub insecure: bool,
    /// Refuse a layer that expands to more than this many bytes per compressed byte
    /// (past 64 MiB).
    #[arg(long, default_value_t = 100)]
    pub max_ratio: u64,
    /// Refuse a layer that expands to more than this (K, M, G, T suffixes).
    #[arg(long, default_value = "64G", value_parser = parse_bytes)]
    pub max_layer_bytes: u64,
    /// Refuse to read more than this over all layers.
    #[arg(long, default_value = "256G", value_parser = parse_bytes)]
    pub max_total_bytes: u64,
    /// Refuse a layer with more entries.
    #[arg(long, default_value_t = 4_000_000)]
    pub max_entries: u64,
}

#[derive(Debug, Args)]
pub struct ModeArgs {
    /// How permission bits are derived: "umask" (0666/0777 plus the image's exec bits,
    /// less --umask) or "image" (the image's bits less --umask).
    #[arg(long, value_enum)]
    pub modes: Option<ModePolicy>,
    /// Octal umask applied to every mode.
    #[arg(long, value_parser = parse_umask)]
    pub umask: Option<u32>,
}

#[derive(Debug, Args)]
pub struct PrepArgs {
    #[command(flatten)]
    pub image: ImageArgs,
    /// The MediaWiki version, e.g. 1.43.0-wmf.5 (directory php-<version>).
    #[arg(long)]
    pub version: String,
    #[arg(long, default_value = "/srv/mediawiki-staging")]
    pub staging_dir: PathBuf,
    /// Where versions live in the image.
    #[arg(long, default_value = "/srv/mediawiki")]
    pub image_root: String,
    /// Write the added, changed and removed paths (relative to the staging directory) here.
    #[arg(long)]
    pub changed_list: Option<PathBuf>,
    /// scap's staging lock (exclusive fcntl lock held for the whole run).
    #[arg(long, default_value = "/var/lock/scap.srv_mediawiki-staging.lock")]
    pub lock_file: PathBuf,
    /// Seconds to wait for the lock (0: fail at once if it is held).
    #[arg(long, default_value_t = 0)]
    pub lock_wait: u64,
    #[command(flatten)]
    pub modes: ModeArgs,
    /// Symlinks whose target leaves php-<version>: refused ("inside") or kept ("any").
    #[arg(long, value_enum, default_value = "inside")]
    pub symlinks: SymlinkPolicy,
    /// Let the image own LocalSettings.php, cache/gitinfo/ and cache/l10n/*.cdb too.
    #[arg(long)]
    pub manage_scap_regions: bool,
}

#[derive(Debug, Args)]
pub struct UnpackArgs {
    #[command(flatten)]
    pub image: ImageArgs,
    pub dir: PathBuf,
    /// The directory of the image to take (default: the whole root file system).
    #[arg(long, default_value = "")]
    pub subpath: String,
    #[arg(long)]
    pub changed_list: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub lock_wait: u64,
    #[command(flatten)]
    pub modes: ModeArgs,
    #[arg(long, value_enum, default_value = "any")]
    pub symlinks: SymlinkPolicy,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub image: ImageArgs,
    pub dir: PathBuf,
    /// The directory of the image to compare with (default: the whole root file system).
    #[arg(long)]
    pub subpath: Option<String>,
    /// Compare a prepared staging tree: the subpath is <image-root>/php-<version>, modes
    /// default to "umask" with 002, and scap's regions and the provenance file are ignored.
    #[arg(long)]
    pub version: Option<String>,
    #[arg(long, default_value = "/srv/mediawiki")]
    pub image_root: String,
    #[command(flatten)]
    pub modes: ModeArgs,
}

fn parse_umask(s: &str) -> std::result::Result<u32, String> {
    u32::from_str_radix(s, 8).ok().filter(|v| *v <= 0o777).ok_or_else(|| format!("{s:?} is not an octal umask"))
}

/// `123`, `64K`, `10M`, `64G`, `1T` (powers of 1024).
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let (num, mul) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("{s:?}: unknown size suffix")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>().ok().and_then(|n| n.checked_mul(mul)).ok_or_else(|| format!("{s:?} is not a size"))
}

/// A version name that is one safe path component.
pub fn check_version(v: &str) -> Result<()> {
    let ok = !v.is_empty()
        && v.len() <= 200
        && v.as_bytes()[0].is_ascii_alphanumeric()
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::Usage(format!("version {v:?} must be letters, digits, '.', '_', '+' and '-'")))
    }
}

fn subpath_of(s: &str) -> Result<String> {
    let trimmed = s.trim_start_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    path::normalize(trimmed.as_bytes()).map_err(|r| Error::Usage(format!("path {s:?}: {r}")))
}

fn version_subpath(root: &str, version: &str) -> Result<String> {
    check_version(version)?;
    Ok(path::join(&subpath_of(root)?, &format!("php-{version}")))
}

impl ImageArgs {
    fn options(&self, subpath: String, symlinks: SymlinkPolicy) -> Result<ImageOptions> {
        let image = self.image.parse().map_err(|e: oci_core::RefError| Error::Usage(e.to_string()))?;
        let registry =
            ClientOptions { insecure: self.insecure, auth_file: self.auth_file.clone(), ..ClientOptions::default() };
        Ok(ImageOptions {
            image,
            platform: self.platform.clone(),
            registry,
            state_dir: self.state_dir.clone().unwrap_or_else(crate::state::default_dir),
            limits: Limits {
                max_layer_bytes: self.max_layer_bytes,
                max_ratio: self.max_ratio,
                max_entries: self.max_entries,
                ..Limits::default()
            },
            max_total_bytes: self.max_total_bytes,
            symlinks,
            subpath,
        })
    }
}

impl ModeArgs {
    fn modes(&self, policy: ModePolicy, umask: u32) -> Modes {
        Modes { policy: self.modes.unwrap_or(policy), umask: self.umask.unwrap_or(umask) }
    }
}

impl PrepArgs {
    pub fn options(&self) -> Result<ApplyOptions> {
        let subpath = version_subpath(&self.image_root, &self.version)?;
        Ok(ApplyOptions {
            image: self.image.options(subpath, self.symlinks)?,
            target: self.staging_dir.join(format!("php-{}", self.version)),
            modes: self.modes.modes(ModePolicy::Umask, 0o002),
            scap_regions: !self.manage_scap_regions,
            provenance: Some(self.version.clone()),
            scap_lock: Some(self.lock_file.clone()),
            lock_wait: Duration::from_secs(self.lock_wait),
            changed_list: self.changed_list.clone(),
        })
    }
}

impl UnpackArgs {
    pub fn options(&self) -> Result<ApplyOptions> {
        Ok(ApplyOptions {
            image: self.image.options(subpath_of(&self.subpath)?, self.symlinks)?,
            target: self.dir.clone(),
            modes: self.modes.modes(ModePolicy::Image, 0),
            scap_regions: false,
            provenance: None,
            scap_lock: None,
            lock_wait: Duration::from_secs(self.lock_wait),
            changed_list: self.changed_list.clone(),
        })
    }
}

impl VerifyArgs {
    pub fn options(&self) -> Result<VerifyOptions> {
        let (subpath, staging) = match (&self.version, &self.subpath) {
            (Some(v), None) => (version_subpath(&self.image_root, v)?, true),
            (None, Some(s)) => (subpath_of(s)?, false),
            (None, None) => (String::new(), false),
            (Some(_), Some(_)) => return Err(Error::Usage("give --version or --subpath, not both".into())),
        };
        let modes =
            if staging { self.modes.modes(ModePolicy::Umask, 0o002) } else { self.modes.modes(ModePolicy::Image, 0) };
        Ok(VerifyOptions {
            image: self.image.options(subpath, SymlinkPolicy::Any)?,
            dir: self.dir.clone(),
            modes,
            staging,
        })
    }
}

fn print_summary(s: &Summary, json: bool, quiet: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(s).unwrap_or_default());
        return;
    }
    if quiet {
        return;
    }
    let c = &s.counts;
    if s.nothing_to_do {
        println!(
            "{}: already up to date with {} ({} files unchanged); wrote 0 bytes in {:.2} s",
            s.target.display(),
            s.manifest_digest,
            c.unchanged,
            s.seconds
        );
        return;
    }
    println!(
        "{}: {} added, {} changed, {} removed, {} unchanged files; {} dirs added, {} removed",
        s.target.display(),
        c.added,
        c.changed,
        c.removed,
        c.unchanged,
        c.dirs_added,
        c.dirs_removed
    );
    println!(
        "wrote {} bytes in {} files; read {} of {} layers; hashed {} live files; {:.2} s",
        s.bytes_written, s.files_written, s.layers_read, s.layers, c.hashed_live_files, s.seconds
    );
}

/// Run a parsed command line; the exit code on success (verify: 1 if there are differences).
pub fn run(cli: &Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Prep(a) => {
            let s = engine::apply(&a.options()?)?;
            print_summary(&s, cli.json, cli.quiet);
        }
        Command::Unpack(a) => {
            // Like umoci: the directory's parents are created (the directory itself is
            // created, or replaced, atomically by the engine).
            if let Some(parent) = std::path::absolute(&a.dir).ok().as_deref().and_then(std::path::Path::parent) {
                std::fs::create_dir_all(parent).map_err(Error::io(parent, "cannot create"))?;
            }
            let s = engine::apply(&a.options()?)?;
            print_summary(&s, cli.json, cli.quiet);
        }
        Command::Verify(a) => {
            let r = verify::verify(&a.options()?)?;
            if cli.json {
                let diffs: Vec<String> = r.differences.iter().map(ToString::to_string).collect();
                println!("{}", serde_json::json!({ "checked": r.checked, "differences": diffs }));
            } else {
                print!("{}", verify::render(&r));
                if !cli.quiet {
                    eprintln!("{} entries checked, {} differences", r.checked, r.differences.len());
                }
            }
            if !r.differences.is_empty() {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> std::result::Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("scap-bridge").chain(args.iter().copied()))
    }

    #[test]
    fn prep_defaults_and_paths() -> Result<()> {
        let cli = parse(&["prep", "oci:/tmp/x:1.43.0-wmf.5", "--version", "1.43.0-wmf.5"])
            .map_err(|e| Error::Usage(e.to_string()))?;
        let Command::Prep(a) = cli.command else { return Err(Error::Usage("not prep".into())) };
        let o = a.options()?;
        assert_eq!(o.image.subpath, "srv/mediawiki/php-1.43.0-wmf.5");
        assert_eq!(o.target, PathBuf::from("/srv/mediawiki-staging/php-1.43.0-wmf.5"));
        assert_eq!(o.modes, Modes { policy: ModePolicy::Umask, umask: 0o002 });
        assert!(o.scap_regions);
        assert_eq!(o.scap_lock.as_deref(), Some(std::path::Path::new("/var/lock/scap.srv_mediawiki-staging.lock")));
        Ok(())
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(parse(&["prep", "oci:/x", "--version", "../etc"])
            .map(|c| match c.command {
                Command::Prep(a) => a.options().is_err(),
                _ => false,
            })
            .unwrap_or(true));
        assert!(parse(&["unpack", "oci:/x", "/d", "--umask", "9"]).is_err());
        assert_eq!(parse_bytes("64G"), Ok(64 << 30));
        assert_eq!(parse_bytes("12"), Ok(12));
        assert!(parse_bytes("1Q").is_err());
        assert!(check_version("1.43.0-wmf.5").is_ok() && check_version("a/b").is_err() && check_version(".x").is_err());
    }
}
