//! Test support: [`TestRegistry`] runs Debian's `docker-registry` (the CNCF distribution
//! registry) on a free loopback port with filesystem storage in a temporary directory, so
//! tests can exercise the registry client against the real thing.
//!
//! The process is killed when the value is dropped; it is also started under
//! `setpriv --pdeathsig KILL` (when available) so that it dies with the test process even
//! if that is killed. (The signal follows the *thread* that started it: start and restart
//! registries from the test's own thread or runtime, not from a `spawn_blocking` task.)
//! Install the binary with `apt-get install docker-registry`.
//!
//! Everything here is synchronous and quick (the registry answers within ~100 ms).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const REGISTRY_BINARY: &str = "/usr/bin/docker-registry";
const READY_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum TestRegistryError {
    #[error("{path} is missing; install it with `apt-get install docker-registry`")]
    Missing { path: PathBuf },
    #[error("test registry: {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("test registry on {host} did not come up: {why}; its log ends with:\n{log}")]
    NotReady { host: String, why: String, log: String },
    #[error("cannot hash the test registry's htpasswd password")]
    Bcrypt(#[source] bcrypt::BcryptError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TestRegistryError {
    let what = what.into();
    move |source| TestRegistryError::Io { what, source }
}

/// Bearer-token auth for the registry (`auth: token:` in its configuration).
#[derive(Debug, Clone)]
pub struct TokenAuth {
    pub realm: String,
    pub service: String,
    pub issuer: String,
    /// PEM certificate(s) whose keys sign the tokens.
    pub root_cert_bundle: PathBuf,
}

#[derive(Debug, Clone, Default)]
pub struct TestRegistryOptions {
    /// Require HTTP basic auth with this user and password (htpasswd, bcrypt).
    pub basic_auth: Option<(String, String)>,
    /// Require bearer tokens.
    pub token_auth: Option<TokenAuth>,
    /// Send relative `Location` headers (`http: relativeurls: true`).
    pub relative_urls: bool,
}

/// A running `docker-registry serve` on `127.0.0.1:<port>`.
pub struct TestRegistry {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl TestRegistry {
    /// Start an open registry.
    pub fn start() -> Result<Self, TestRegistryError> {
        Self::start_with(&TestRegistryOptions::default())
    }

    /// Start a registry that requires basic auth as `user`/`password`.
    pub fn start_with_basic_auth(user: &str, password: &str) -> Result<Self, TestRegistryError> {
        Self::start_with(&TestRegistryOptions {
            basic_auth: Some((user.to_string(), password.to_string())),
            ..TestRegistryOptions::default()
        })
    }

    pub fn start_with(opts: &TestRegistryOptions) -> Result<Self, TestRegistryError> {
        if !Path::new(REGISTRY_BINARY).exists() {
            return Err(TestRegistryError::Missing { path: REGISTRY_BINARY.into() });
        }
        let mut tries = 0;
        loop {
            tries += 1;
            let dir =
                tempfile::Builder::new().prefix("test-registry-").tempdir().map_err(io("cannot create temp dir"))?;
            let mut reg = TestRegistry { dir, port: free_port()?, child: None };
            reg.write_config(opts)?;
            match reg.spawn() {
                Ok(()) => return Ok(reg),
                // The port was free when chosen but was taken before the registry bound it.
                Err(TestRegistryError::NotReady { ref log, .. })
                    if tries < 3 && log.contains("address already in use") => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The registry's storage, configuration and log live here.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yml")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kill the registry (abruptly, like a crash). Storage is kept.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stop and start again on the same port with the same storage.
    pub fn restart(&mut self) -> Result<(), TestRegistryError> {
        self.stop();
        self.spawn()
    }

    /// A docker `config.json` giving `user`/`password` for this registry.
    pub fn write_auth_file(&self, path: &Path, user: &str, password: &str) -> Result<(), TestRegistryError> {
        use base64::Engine as _;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let json = serde_json::json!({ "auths": { self.host(): { "auth": auth } } });
        std::fs::write(path, json.to_string()).map_err(io(format!("cannot write {}", path.display())))
    }

    fn write_config(&self, opts: &TestRegistryOptions) -> Result<(), TestRegistryError> {
        let storage = self.storage_dir();
        std::fs::create_dir_all(&storage).map_err(io("cannot create storage dir"))?;
        let secret: String = {
            use rand::Rng as _;
            let mut rng = rand::thread_rng();
            (0..32).map(|_| char::from(b'a' + rng.gen_range(0..26u8))).collect()
        };
        let mut cfg = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: {secret}\n  relativeurls: {rel}\n",
            storage = yaml_str(&storage.display().to_string()),
            port = self.port,
            rel = opts.relative_urls,
        );
        if let Some((user, password)) = &opts.basic_auth {
            let hash = bcrypt::hash(password, 4).map_err(TestRegistryError::Bcrypt)?;
            let htpasswd = self.dir.path().join("htpasswd");
            std::fs::write(&htpasswd, format!("{user}:{hash}\n")).map_err(io("cannot write htpasswd"))?;
            cfg.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: test-registry\n    path: {}\n",
                yaml_str(&htpasswd.display().to_string())
            ));
        } else if let Some(t) = &opts.token_auth {
            cfg.push_str(&format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                yaml_str(&t.realm),
                yaml_str(&t.service),
                yaml_str(&t.issuer),
                yaml_str(&t.root_cert_bundle.display().to_string()),
            ));
        }
        std::fs::write(self.config_path(), cfg).map_err(io("cannot write registry config"))
    }

    fn spawn(&mut self) -> Result<(), TestRegistryError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(io("cannot open registry log"))?;
        let log2 = log.try_clone().map_err(io("cannot open registry log"))?;
        let mut cmd = if Path::new("/usr/bin/setpriv").exists() {
            let mut c = Command::new("/usr/bin/setpriv");
            c.args(["--pdeathsig", "KILL", "--", REGISTRY_BINARY]);
            c
        } else {
            Command::new(REGISTRY_BINARY)
        };
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        cmd.arg("serve").arg(self.config_path()).stdin(Stdio::null()).stdout(log).stderr(log2);
        // REGISTRY_* variables would override the configuration file.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("REGISTRY_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd.spawn().map_err(io(format!("cannot start {REGISTRY_BINARY}")))?;
        self.child = Some(child);
        self.wait_ready(log_start)
    }

    /// Whether this run's part of the log says the registry is listening (so that an
    /// answer on the port is not from some other process).
    fn listening(&self, log_start: u64) -> bool {
        let Ok(mut f) = std::fs::File::open(self.log_path()) else { return false };
        let mut text = String::new();
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(log_start)).is_ok()
            && f.read_to_string(&mut text).is_ok()
            && text.contains(&format!("listening on 127.0.0.1:{}", self.port))
    }

    fn wait_ready(&mut self, log_start: u64) -> Result<(), TestRegistryError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    return Err(self.not_ready(format!("it exited with {status}")));
                }
            }
            if self.listening(log_start) && matches!(probe(addr), Some(200 | 401)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(self.not_ready(format!("/v2/ did not answer within {READY_TIMEOUT:?}")));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn not_ready(&self, why: String) -> TestRegistryError {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        let log = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
        TestRegistryError::NotReady { host: self.host(), why, log }
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> Result<u16, TestRegistryError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("cannot find a free port"))?;
    Ok(l.local_addr().map_err(io("cannot find a free port"))?.port())
}

/// The status of `GET /v2/`, if something answers HTTP there.
fn probe(addr: SocketAddr) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let line = std::str::from_utf8(&buf[..n]).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A YAML double-quoted string.
fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
}
