//! Real-service fixtures: a `nats-server -js` per test, a fresh Postgres database per test, the simulator and Sluice services.
//!
//! Everything listens on loopback on a port the OS picks (a test's own Postgres
//! cluster on a Unix socket in its folder), and everything a
//! fixture starts is stopped when it is dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio_util::sync::CancellationToken;

use crate::sim::{Sim, SimConfig};

/// Waits until `cond` returns true, checking every 50 ms, failing after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut cond: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `nats-server` with JetStream on a random port and a temporary store.
pub struct NatsServer {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts `nats-server` (from `SLUICE_NATS_SERVER` or the PATH).
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with_config("")
    }

    /// Like [`NatsServer::start`], with `config` (nats-server's configuration
    /// syntax: `tls { }`, `authorization { }`, ...) as its configuration
    /// file. `{dir}` in it stands for the server's own folder.
    pub fn start_with_config(config: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("nats.conf"), config.replace("{dir}", &dir.path().display().to_string()))?;
        let (child, url) = Self::spawn(dir.path(), "-1")?;
        Ok(NatsServer { child, url, _dir: dir })
    }

    /// The folder the server keeps its configuration, log and store in.
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// What the server has logged so far (permission violations among it).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("nats.log")).unwrap_or_default()
    }

    /// Kills the server (SIGKILL) and leaves it down.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the server (SIGKILL), throws its JetStream store away and starts
    /// it again on the same port: NATS as it comes back after losing its
    /// volume. Clients reconnect by themselves.
    pub fn restart_empty(&mut self) -> anyhow::Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::remove_dir_all(self.store_dir())?;
        let port = self.url.rsplit(':').next().context("the URL has a port")?.to_string();
        let (child, url) = Self::spawn(self._dir.path(), &port)?;
        self.child = child;
        self.url = url;
        Ok(())
    }

    fn spawn(dir: &Path, port: &str) -> anyhow::Result<(Child, String)> {
        let bin = std::env::var("SLUICE_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
        let mut child = Command::new(&bin)
            .arg("-c")
            .arg(dir.join("nats.conf"))
            .args(["-js", "-a", "127.0.0.1", "-p", port, "--store_dir"])
            .arg(dir.join("store"))
            .arg("-l")
            .arg(dir.join("nats.log"))
            .arg("--ports_file_dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {bin}: run the tests with scripts/test, which installs it, or set SLUICE_NATS_SERVER"
                )
            })?;
        let ports = dir.join(format!("nats-server_{}.ports", child.id()));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ports) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                    if let Some(url) = v["nats"][0].as_str() {
                        return Ok((child, url.to_string()));
                    }
                }
            }
            if let Some(status) = child.try_wait()? {
                bail!("nats-server exited early with {status}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("nats-server did not write its ports file {}", ports.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server's JetStream store, to inspect what it keeps on disk.
    pub fn store_dir(&self) -> PathBuf {
        self._dir.path().join("store")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh Postgres database with Sluice's migrations applied, dropped with the fixture.
pub struct TestDb {
    /// The owner's URL (migrations, test assertions); `pool` connects with it.
    pub url: String,
    pub pool: sqlx::PgPool,
    admin_url: String,
    name: String,
}

/// A token secret file for coordinators started by tests: one per test
/// process, readable only by its owner, as `sluice admin secret` writes it.
pub fn token_secret_file() -> PathBuf {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary folder");
        common::private_file::write(&dir.path().join("token-secret"), &coordinator::auth::TokenSecret::generate())
            .expect("writing the token secret");
        dir
    });
    dir.path().join("token-secret")
}

/// The coordinator's configuration with the defaults a user gets, on the
/// given services, with the tests' token secret.
pub fn serve_config(database_url: &str, nats_url: &str) -> coordinator::ServeConfig {
    let mut config = coordinator::ServeConfig::for_urls(database_url, nats_url);
    config.token_secret_file = Some(token_secret_file());
    config
}

/// A token of `role` in `project` made straight in the database (as an
/// admin would through the API).
pub async fn make_token(
    pool: &sqlx::PgPool,
    name: &str,
    project: &str,
    role: coordinator::auth::Role,
) -> anyhow::Result<coordinator::auth::CreatedToken> {
    let secret = coordinator::auth::TokenSecret::load(&token_secret_file())?;
    let new = coordinator::auth::NewToken { name: name.into(), project: project.into(), role, expires_in_s: None };
    Ok(coordinator::auth::create(pool, &secret, &new, "test").await?)
}

/// A certificate authority of a test's own, for TLS between Sluice's parts.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        Ok(TestCa { issuer: rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate()?)? })
    }

    /// The CA's certificate (PEM), for clients to trust.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `names` (host names or IP addresses) and its
    /// private key, both PEM.
    pub fn server(&self, names: &[&str]) -> anyhow::Result<(String, String)> {
        let key = rcgen::KeyPair::generate()?;
        let params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Writes the CA certificate, and a server certificate and key for
    /// `names`, into `dir` as ca.pem, cert.pem and key.pem (mode 600).
    pub fn write_server_files(&self, dir: &Path, names: &[&str]) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
        let (cert, key) = self.server(names)?;
        let paths = (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&paths.0, self.pem())?;
        std::fs::write(&paths.1, cert)?;
        common::private_file::write(&paths.2, &key)?;
        Ok(paths)
    }
}

/// The server-level URL tests create databases through.
pub fn admin_url() -> String {
    std::env::var("SLUICE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://sluice:sluice@127.0.0.1:5432/postgres".into())
}

impl TestDb {
    /// The URL `role` (`sluice_coordinator`, `sluice_worker`: roles that own
    /// nothing, made by scripts/lib.sh) connects to this database with.
    pub fn app_url(&self, role: &str) -> String {
        let (scheme, rest) = self.url.split_once("://").expect("a URL");
        let host = rest.split_once('@').map_or(rest, |(_, h)| h);
        let password = rest.split_once('@').and_then(|(cred, _)| cred.split_once(':')).map_or("", |(_, p)| p);
        format!("{scheme}://{role}:{password}@{host}")
    }

    pub async fn create() -> anyhow::Result<Self> {
        Self::create_on(&admin_url()).await
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A database on the server at `admin_url` (a server-level URL of a role that may create databases).
    pub async fn create_on(admin_url: &str) -> anyhow::Result<Self> {
        let db = Self::create_empty(admin_url).await?;
        migrations::MIGRATOR.run(&db.pool).await?;
        Ok(db)
    }

    /// A database without Sluice's schema, for tests of migrating it.
    pub async fn create_empty(admin_url: &str) -> anyhow::Result<Self> {
        let admin_url = admin_url.to_string();
        // The process id lets scripts/test drop databases of test runs that
        // died, and only those.
        let name = format!("sluice_t_{}_{}", std::process::id(), uuid::Uuid::new_v4().simple());
        let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url)
            .await
            .with_context(|| format!("cannot reach Postgres at {admin_url}: run scripts/test, which starts it"))?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await?;
        let base = admin_url.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin_url);
        let url = format!("{base}/{name}");
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&url).await?;
        Ok(TestDb { url, pool, admin_url, name })
    }
}

/// PgBouncer (from `SLUICE_PGBOUNCER`, which scripts/test builds) in
/// transaction mode on a free port in front of the test Postgres, with
/// `server_pool` server connections per database and user, and its admin
/// console open to the admin URL's user. `max_prepared_statements` as
/// given (0: named statements are not carried across server connections,
/// PgBouncer's default). Stopped when dropped.
pub struct Pooler {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    /// The test Postgres's admin URL, whose host and port PgBouncer forwards to.
    upstream: sqlx::postgres::PgConnectOptions,
}

impl Pooler {
    pub async fn start(server_pool: u32, max_prepared_statements: u32) -> anyhow::Result<Self> {
        let bin = std::env::var("SLUICE_PGBOUNCER")
            .context("SLUICE_PGBOUNCER is not set: run the tests with scripts/test, which builds PgBouncer")?;
        let upstream: sqlx::postgres::PgConnectOptions = admin_url().parse()?;
        let password = admin_url()
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('@'))
            .and_then(|(cred, _)| cred.split_once(':'))
            .map_or(String::new(), |(_, p)| p.to_string());
        let admin = upstream.get_username().to_string();
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = tempfile::tempdir()?;
        let users: String = [admin.as_str(), "sluice_worker", "sluice_coordinator"]
            .iter()
            .map(|u| format!("\"{u}\" \"{password}\"\n"))
            .collect();
        std::fs::write(dir.path().join("userlist.txt"), users)?;
        // What transaction pooling needs of PgBouncer for sqlx: named
        // statements tracked across server connections (1.21 and later), and
        // sqlx's extra_float_digits startup parameter let through.
        let ini = format!(
            "[databases]\n* = host={host} port={pg_port}\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
             unix_socket_dir =\nauth_type = plain\nauth_file = {dir}/userlist.txt\nadmin_users = {admin}\n\
             pool_mode = transaction\nmax_prepared_statements = {max_prepared_statements}\ndefault_pool_size = {server_pool}\n\
             max_client_conn = 500\nignore_startup_parameters = extra_float_digits\nlogfile = {dir}/pgbouncer.log\n\
             pidfile = {dir}/pgbouncer.pid\n",
            host = upstream.get_host(),
            pg_port = upstream.get_port(),
            dir = dir.path().display(),
        );
        std::fs::write(dir.path().join("pgbouncer.ini"), ini)?;
        // PgBouncer refuses to run as root: as root, it runs as postgres,
        // which then owns its folder.
        let uid = Command::new("id").arg("-u").output()?.stdout;
        let mut cmd = if String::from_utf8_lossy(&uid).trim() == "0" {
            let ok = Command::new("chown").args(["-R", "postgres:"]).arg(dir.path()).status()?.success();
            anyhow::ensure!(ok, "cannot give {} to the postgres user", dir.path().display());
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        let child = cmd
            .arg(dir.path().join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start PgBouncer ({bin})"))?;
        let pooler = Pooler { child, port, dir, upstream };
        wait_for("PgBouncer to listen", Duration::from_secs(10), || async {
            Ok(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok())
        })
        .await?;
        Ok(pooler)
    }

    /// `url` (a database URL of the test Postgres) pointed at PgBouncer instead.
    pub fn url_for(&self, url: &str) -> String {
        url.replacen(
            &format!("{}:{}/", self.upstream.get_host(), self.upstream.get_port()),
            &format!("127.0.0.1:{}/", self.port),
            1,
        )
    }

    /// The port PgBouncer listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// PgBouncer's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for Pooler {
    fn drop(&mut self) {
        // PgBouncer's own pid: runuser, the child, does not pass SIGKILL on.
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("pgbouncer.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Postgres server of the test's own, in a temporary folder, for tests
/// that stop and start it. Its superuser is `sluice`; it has the
/// application roles scripts/lib.sh makes on the shared server. It listens
/// only on a Unix socket in its folder, so it needs no TCP port.
pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
    /// The TCP port, once [`PgCluster::listen_tls`] has opened one.
    port: Option<u16>,
}

impl PgCluster {
    pub async fn start() -> anyhow::Result<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL's server programs are not installed: run scripts/test, which installs them")?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").exists())
            .max()
            .context("no initdb under /usr/lib/postgresql")?;
        let dir = tempfile::tempdir()?;
        // initdb refuses to run as root: the cluster then belongs to postgres.
        let uid = Command::new("id").arg("-u").output()?.stdout;
        let as_postgres = String::from_utf8_lossy(&uid).trim() == "0";
        if as_postgres {
            let ok = Command::new("chown").args(["-R", "postgres:"]).arg(dir.path()).status()?.success();
            anyhow::ensure!(ok, "cannot hand {} to the postgres user", dir.path().display());
        }
        let cluster = PgCluster { dir, bin, as_postgres, port: None };
        let data = cluster.data();
        cluster.run("initdb", &["-D", &data, "-A", "trust", "-U", "sluice", "--no-sync", "-E", "UTF8"])?;
        cluster.start_server()?;
        let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&cluster.admin_url()).await?;
        sqlx::raw_sql(
            "CREATE ROLE sluice_app NOLOGIN;
             CREATE ROLE sluice_control NOLOGIN;
             CREATE ROLE sluice_coordinator LOGIN IN ROLE sluice_app, sluice_control;
             CREATE ROLE sluice_worker LOGIN IN ROLE sluice_app;",
        )
        .execute(&mut admin)
        .await?;
        Ok(cluster)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let path = self.bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let out = cmd.args(args).stdin(Stdio::null()).output()?;
        anyhow::ensure!(
            out.status.success(),
            "{program} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Starts the server (again), waiting until it accepts connections.
    pub fn start_server(&self) -> anyhow::Result<()> {
        let listen = match self.port {
            Some(port) => format!("-c listen_addresses=127.0.0.1 -p {port}"),
            None => "-c listen_addresses=''".into(),
        };
        let opts = format!("-k {} {listen} -c fsync=off", self.dir.path().display());
        let log = self.dir.path().join("postgres.log").display().to_string();
        self.run("pg_ctl", &["-D", &self.data(), "-l", &log, "-o", &opts, "-w", "start"])
    }

    /// Restarts the server listening on 127.0.0.1 too, with TLS only there
    /// (`hostnossl` connections are rejected), serving `cert` and `key`
    /// (PEM). Returns the TCP port: one is tried after another until the
    /// server starts on a free one, since Postgres cannot take port 0.
    pub fn listen_tls(&mut self, cert: &str, key: &str) -> anyhow::Result<u16> {
        let data = PathBuf::from(self.data());
        self.stop_server()?;
        for (name, text) in [("server.crt", cert), ("server.key", key)] {
            common::private_file::write(&data.join(name), text)?;
        }
        let mut conf = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf"))?;
        std::io::Write::write_all(
            &mut conf,
            b"\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
        )?;
        let hba = std::fs::read_to_string(data.join("pg_hba.conf"))?;
        std::fs::write(data.join("pg_hba.conf"), format!("hostnossl all all 0.0.0.0/0 reject\n{hba}"))?;
        if self.as_postgres {
            let ok = Command::new("chown").args(["-R", "postgres:"]).arg(&data).status()?.success();
            anyhow::ensure!(ok, "cannot hand {} to the postgres user", data.display());
        }
        let first = 20_000 + (std::process::id() % 20_000) as u16;
        for port in (first..).take(50) {
            self.port = Some(port);
            if self.start_server().is_ok() {
                return Ok(port);
            }
        }
        bail!("Postgres found no free port from {first}")
    }

    /// Stops the server as an operator would (`pg_ctl stop -m fast`): sessions are cut off.
    pub fn stop_server(&self) -> anyhow::Result<()> {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"])
    }

    /// A server-level URL of the superuser, for [`TestDb::create_on`]. The
    /// host is the socket's folder, percent-encoded (sqlx takes a host that
    /// decodes to an absolute path as a Unix socket directory).
    pub fn admin_url(&self) -> String {
        let socket_dir = self.dir.path().display().to_string().replace('/', "%2F");
        // The socket's name carries the port.
        format!("postgres://sluice:sluice@{socket_dir}:{}/postgres", self.port.unwrap_or(5432))
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.run("pg_ctl", &["-D", &self.data(), "-m", "immediate", "-w", "stop"]);
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs outside async context: use a small runtime on a thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(async {
                let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url).await.ok()?;
                sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                    .execute(&mut admin)
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// The simulator, in-process, on a random port.
pub struct SimServer {
    pub sim: Arc<Sim>,
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl SimServer {
    pub async fn start(config: SimConfig) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let sim = Sim::new(config);
        let stop = CancellationToken::new();
        tokio::spawn(crate::sim::serve(listener, sim.clone(), stop.clone()));
        Ok(SimServer { sim, addr, stop })
    }

    /// Base URL for `SLUICE_MODEL_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A complete Sluice deployment for one test: Postgres database, NATS,
/// simulator and coordinator; workers are added with [`Stack::add_worker`].
pub struct Stack {
    pub db: TestDb,
    pub nats: NatsServer,
    pub sim: SimServer,
    /// Further simulators, for jobs spread over several providers.
    pub others: Vec<SimServer>,
    /// The providers file the coordinator and workers use, if any.
    pub providers_file: Option<PathBuf>,
    _files: Option<tempfile::TempDir>,
    /// A client with an admin token of the project "default".
    pub client: coordinator::client::Client,
    /// That token, for requests made by hand.
    pub admin_token: String,
    pub coordinator_addr: SocketAddr,
    stop: CancellationToken,
    workers: Vec<CancellationToken>,
}

impl Stack {
    /// Starts everything but workers. `tune` may adjust the coordinator's configuration.
    pub async fn start(sim: SimConfig, tune: impl FnOnce(&mut coordinator::ServeConfig)) -> anyhow::Result<Self> {
        Self::start_inner(TestDb::create().await?, NatsServer::start()?, vec![sim], None, tune).await
    }

    /// Like [`Stack::start`], on a NATS server of the caller's (with TLS or
    /// users, say; `tune` then gives the coordinator its settings).
    pub async fn start_on_nats(
        nats: NatsServer,
        sim: SimConfig,
        tune: impl FnOnce(&mut coordinator::ServeConfig),
    ) -> anyhow::Result<Self> {
        Self::start_inner(TestDb::create().await?, nats, vec![sim], None, tune).await
    }

    /// Like [`Stack::start`], on a database of the caller's.
    pub async fn start_on(db: TestDb, sim: SimConfig) -> anyhow::Result<Self> {
        Self::start_inner(db, NatsServer::start()?, vec![sim], None, |_| {}).await
    }

    /// Like [`Stack::start_on`], with `tune` adjusting the coordinator's configuration.
    pub async fn start_on_tuned(
        db: TestDb,
        sim: SimConfig,
        tune: impl FnOnce(&mut coordinator::ServeConfig),
    ) -> anyhow::Result<Self> {
        Self::start_inner(db, NatsServer::start()?, vec![sim], None, tune).await
    }

    /// Starts a simulator per entry of `sims` and writes `providers` as the
    /// providers file of the coordinator and the workers, with `{sim0}`,
    /// `{sim1}`, ... replaced by the simulators' `host:port` and `{dir}` by a
    /// folder for key files.
    pub async fn start_with_providers(sims: Vec<SimConfig>, providers: &str) -> anyhow::Result<Self> {
        Self::start_inner(TestDb::create().await?, NatsServer::start()?, sims, Some(providers), |_| {}).await
    }

    async fn start_inner(
        db: TestDb,
        nats: NatsServer,
        sims: Vec<SimConfig>,
        providers: Option<&str>,
        tune: impl FnOnce(&mut coordinator::ServeConfig),
    ) -> anyhow::Result<Self> {
        let mut started = Vec::new();
        for config in sims {
            started.push(SimServer::start(config).await?);
        }
        let mut config = serve_config(&db.app_url("sluice_coordinator"), nats.url());
        let (mut files, mut providers_file) = (None, None);
        if let Some(text) = providers {
            let dir = tempfile::tempdir()?;
            let mut text = text.replace("{dir}", &dir.path().display().to_string());
            for (i, s) in started.iter().enumerate() {
                text = text.replace(&format!("{{sim{i}}}"), &s.addr.to_string());
            }
            let path = dir.path().join("providers.toml");
            std::fs::write(&path, text)?;
            config.providers_file = Some(path.clone());
            providers_file = Some(path);
            files = Some(dir);
        }
        tune(&mut config);
        let coord = coordinator::Coordinator::bind(config).await?;
        let coordinator_addr = coord.local_addr();
        let stop = CancellationToken::new();
        tokio::spawn(coord.run(stop.clone()));
        let admin = make_token(&db.pool, "test-admin", "default", coordinator::auth::Role::Admin).await?;
        let client = coordinator::client::Client::new(&format!("http://{coordinator_addr}")).with_token(&admin.token);
        let mut sims = started.into_iter();
        let sim = sims.next().context("at least one simulator")?;
        Ok(Stack {
            db,
            nats,
            sim,
            others: sims.collect(),
            providers_file,
            _files: files,
            client,
            admin_token: admin.token,
            coordinator_addr,
            stop,
            workers: Vec::new(),
        })
    }

    /// Stops the coordinator the stack started (gracefully: it hands over
    /// its leader lease), for tests that run coordinators of their own.
    pub async fn stop_coordinator(&self) -> anyhow::Result<()> {
        self.stop.cancel();
        let url = format!("http://{}", self.coordinator_addr);
        wait_for("the stack's coordinator stopped", Duration::from_secs(30), || async {
            Ok(readiness(&url).await.is_none())
        })
        .await
    }

    /// A client with a new token of `role` in `project`, held by `name`.
    pub async fn client_as(
        &self,
        name: &str,
        project: &str,
        role: coordinator::auth::Role,
    ) -> anyhow::Result<coordinator::client::Client> {
        let token = make_token(&self.db.pool, name, project, role).await?;
        Ok(coordinator::client::Client::new(&format!("http://{}", self.coordinator_addr)).with_token(&token.token))
    }

    /// The folder of the providers file (for key files), if there is one.
    pub fn files_dir(&self) -> Option<&Path> {
        self._files.as_ref().map(|d| d.path())
    }

    /// A worker configuration pointing at this stack.
    pub fn worker_config(&self) -> worker::WorkerConfig {
        let mut c =
            worker::WorkerConfig::for_urls(&self.db.app_url("sluice_worker"), self.nats.url(), &self.sim.base_url());
        c.providers_file = self.providers_file.clone();
        c
    }

    /// Starts an in-process worker; returns the token that stops it.
    pub fn add_worker(&mut self, tune: impl FnOnce(&mut worker::WorkerConfig)) -> CancellationToken {
        let mut config = self.worker_config();
        config.name = Some(format!("test-worker-{}", self.workers.len() + 1));
        tune(&mut config);
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            if let Err(e) = worker::run(config, token).await {
                eprintln!("worker stopped with error: {e:?}");
            }
        });
        self.workers.push(stop.clone());
        stop
    }

    /// Submits `lines` (joined with newlines) as a job of the kind in `jobs/<kind>`.
    pub async fn submit(
        &self,
        kind: &str,
        input: Vec<u8>,
        skip_invalid: bool,
    ) -> Result<coordinator::model::IngestReport, coordinator::client::ClientError> {
        let kind = common::spec::JobKind::load(&jobs_dir().join(kind)).expect("shipped job kind loads");
        self.submit_kind(kind, input, skip_invalid).await
    }

    pub async fn submit_kind(
        &self,
        kind: common::spec::JobKind,
        input: Vec<u8>,
        skip_invalid: bool,
    ) -> Result<coordinator::model::IngestReport, coordinator::client::ClientError> {
        let job_id = self
            .client
            .create_job(&coordinator::model::NewJob {
                input_name: Some("test.jsonl".into()),
                ..coordinator::model::NewJob::new(kind)
            })
            .await?
            .job_id;
        // Send the input in small pieces so line splitting across reads is exercised.
        let pieces: Vec<Result<bytes::Bytes, std::io::Error>> =
            input.chunks(4096).map(|c| Ok(bytes::Bytes::copy_from_slice(c))).collect();
        self.client.upload(job_id, futures::stream::iter(pieces), skip_invalid).await
    }

    /// Runs the `sluice` command line against this stack's coordinator with its admin token.
    pub fn sluice(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(workspace_bin("sluice").expect("the sluice binary is built"))
            .args(args)
            .env("SLUICE_COORDINATOR", format!("http://{}", self.coordinator_addr))
            .env("SLUICE_TOKEN", &self.admin_token)
            .output()
            .expect("sluice runs")
    }

    /// Waits until the job is completed.
    pub async fn wait_completed(&self, job_id: uuid::Uuid, timeout: Duration) -> anyhow::Result<()> {
        wait_for("job completion", timeout, || async {
            let st = self.client.status(job_id).await?;
            Ok(st.state == "completed")
        })
        .await
    }

    /// The job's status as the API reports it, after checking every figure
    /// the tallies give against the same figure aggregated from `results`
    /// and `audit_attempts` directly.
    pub async fn status(&self, job_id: uuid::Uuid) -> anyhow::Result<coordinator::model::JobStatus> {
        use sqlx::Row;
        let st = self.client.status(job_id).await?;
        let pool = &self.db.pool;
        let r = sqlx::query(
            "SELECT count(*) FILTER (WHERE state <> 'failed') AS succeeded,
                    count(*) FILTER (WHERE state = 'needs_review') AS needs_review,
                    count(*) FILTER (WHERE state = 'reviewed') AS reviewed,
                    count(*) FILTER (WHERE state = 'failed') AS failed
             FROM results WHERE job_id = $1",
        )
        .bind(job_id)
        .fetch_one(pool)
        .await?;
        let counted: [i64; 4] = [r.get("succeeded"), r.get("needs_review"), r.get("reviewed"), r.get("failed")];
        let reported = [st.succeeded, st.needs_review, st.reviewed, st.failed].map(|n| n as i64);
        anyhow::ensure!(counted == reported, "results by state: tables {counted:?}, status {reported:?}");
        let a = sqlx::query(
            "SELECT coalesce(sum(tokens_in), 0)::bigint AS tokens_in, coalesce(sum(tokens_out), 0)::bigint AS tokens_out,
                    coalesce(sum(cost_usd), 0)::float8 AS cost_usd, count(*) FILTER (WHERE cost_usd IS NULL) AS unpriced
             FROM audit_attempts WHERE job_id = $1",
        )
        .bind(job_id)
        .fetch_one(pool)
        .await?;
        let counted: [i64; 3] = [a.get("tokens_in"), a.get("tokens_out"), a.get("unpriced")];
        let reported = [st.tokens_in as i64, st.tokens_out as i64, st.unpriced_attempts as i64];
        anyhow::ensure!(counted == reported, "tokens in, out, unpriced: audit trail {counted:?}, status {reported:?}");
        let cost: f64 = a.get("cost_usd");
        anyhow::ensure!((cost - st.cost_usd).abs() < 1e-9, "cost: audit trail {cost}, status {}", st.cost_usd);
        let sources: Vec<(String, i64)> = sqlx::query(
            "SELECT coalesce(confidence_detail->>'strategy', 'none') AS strategy, count(*) AS n
             FROM results WHERE job_id = $1 AND state <> 'failed' GROUP BY 1 ORDER BY 2 DESC, 1",
        )
        .bind(job_id)
        .fetch_all(pool)
        .await?
        .iter()
        .map(|r| (r.get("strategy"), r.get("n")))
        .collect();
        let reported: Vec<(String, i64)> =
            st.confidence_sources.iter().map(|c| (c.strategy.clone(), c.results as i64)).collect();
        anyhow::ensure!(sources == reported, "confidence sources: results {sources:?}, status {reported:?}");
        let modes: Vec<(String, String, String, i64)> = sqlx::query(
            "SELECT coalesce(provider, '') AS provider, model, output_mode, count(*) AS n FROM audit_attempts
             WHERE job_id = $1 AND output_mode IS NOT NULL GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
        )
        .bind(job_id)
        .fetch_all(pool)
        .await?
        .iter()
        .map(|r| (r.get("provider"), r.get("model"), r.get("output_mode"), r.get("n")))
        .collect();
        let reported: Vec<(String, String, String, i64)> = st
            .output_modes
            .iter()
            .map(|m| (m.provider.clone(), m.model.clone(), m.mode.clone(), m.attempts as i64))
            .collect();
        anyhow::ensure!(modes == reported, "output modes: audit trail {modes:?}, status {reported:?}");
        let c = sqlx::query(
            "SELECT count(*) AS total, count(*) FILTER (WHERE state = 'done') AS done FROM chunks WHERE job_id = $1",
        )
        .bind(job_id)
        .fetch_one(pool)
        .await?;
        let counted: [i64; 2] = [c.get("total"), c.get("done")];
        let reported = [st.chunks_total as i64, st.chunks_done as i64];
        anyhow::ensure!(counted == reported, "chunks total, done: table {counted:?}, status {reported:?}");
        // Each stage's figures, counted from the rows as the status did before it kept tallies.
        let rows = sqlx::query(
            "SELECT stage, sum(passed)::bigint AS passed, sum(answers)::bigint AS answers,
                    sum(needs_review)::bigint AS needs_review, sum(failed)::bigint AS failed,
                    sum(waiting)::bigint AS waiting, sum(attempts)::bigint AS attempts, sum(cost)::float8 AS cost
             FROM (SELECT stage,
                          count(DISTINCT seq) FILTER (WHERE state IN ('succeeded', 'needs_review', 'approved')) AS passed,
                          count(*) FILTER (WHERE state IN ('succeeded', 'needs_review', 'approved')) AS answers,
                          count(*) FILTER (WHERE state = 'needs_review') AS needs_review, 0 AS failed,
                          count(*) FILTER (WHERE state = 'held') AS waiting, 0 AS attempts, 0 AS cost
                   FROM stage_results WHERE job_id = $1 GROUP BY stage
                   UNION ALL
                   SELECT stage, count(*) FILTER (WHERE state <> 'failed'), count(*) FILTER (WHERE state <> 'failed'),
                          count(*) FILTER (WHERE state = 'needs_review'), count(*) FILTER (WHERE state = 'failed'), 0, 0, 0
                   FROM results WHERE job_id = $1 AND stage IS NOT NULL GROUP BY stage
                   UNION ALL
                   SELECT stage, 0, 0, 0, 0, 0, count(*), coalesce(sum(cost_usd), 0)
                   FROM audit_attempts WHERE job_id = $1 GROUP BY stage) s
             GROUP BY stage ORDER BY stage",
        )
        .bind(job_id)
        .fetch_all(pool)
        .await?;
        for (i, stage) in st.stages.iter().enumerate() {
            let r = rows.iter().find(|r| r.get::<i16, _>("stage") as usize == i);
            let n = |col: &str| r.map_or(0, |r| r.get::<i64, _>(col)) as u64;
            let counted = [n("passed"), n("answers"), n("needs_review"), n("failed"), n("waiting"), n("attempts")];
            let reported =
                [stage.passed, stage.answers, stage.needs_review, stage.failed, stage.waiting, stage.attempts];
            anyhow::ensure!(
                counted == reported,
                "stage {i} passed, answers, needs review, failed, waiting, attempts: rows {counted:?}, status {reported:?}"
            );
            let cost = r.map_or(0.0, |r| r.get::<f64, _>("cost"));
            anyhow::ensure!(
                (cost - stage.cost_usd).abs() < 1e-9,
                "stage {i} cost: rows {cost}, status {}",
                stage.cost_usd
            );
        }
        Ok(st)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for w in &self.workers {
            w.cancel();
        }
        self.stop.cancel();
    }
}

/// The repository's `jobs/` folder.
pub fn jobs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../jobs")
}

/// `count` sample documents as JSONL.
pub fn sample_jsonl(seed: u64, count: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..count {
        serde_json::to_writer(&mut out, &common::sample::document(seed, i)).expect("serialises");
        out.push(b'\n');
    }
    out
}

/// A job of the shipped kind `kind` (e.g. "classify"), as `sluice submit`
/// sends it with no option: the token's project, the kind's threshold.
pub fn new_job(kind: &str) -> coordinator::model::NewJob {
    coordinator::model::NewJob::new(
        common::spec::JobKind::load(&jobs_dir().join(kind)).expect("shipped job kind loads"),
    )
}

/// Path of a binary built from this workspace (tests run from target/<profile>/deps).
pub fn workspace_bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(Path::parent).context("test binary has no target directory")?;
    let path = dir.join(name);
    if !path.exists() {
        bail!("{} is missing: build it first with `cargo build --workspace --bins`", path.display());
    }
    Ok(path)
}

/// The address a process reports in its JSON log (`SLUICE_LOG_FORMAT=json`,
/// `SLUICE_LOG=info`) under `message`, e.g. "coordinator listening": processes
/// in tests listen on port 0 and the OS picks a free one, with no window in
/// which another test could take it.
pub async fn logged_addr(log: &Path, message: &str) -> anyhow::Result<SocketAddr> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let addr = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["fields"]["message"] == message)
            .and_then(|v| v["fields"]["addr"].as_str().and_then(|a| a.parse().ok()));
        if let Some(addr) = addr {
            return Ok(addr);
        }
        if Instant::now() > deadline {
            bail!("{} has no line {message:?} after 30 s:\n{text}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `sluice serve` in its own process, with JSON logs in a file: for tests
/// of what a real coordinator process exports, logs and answers.
pub struct ServeProcess {
    child: Child,
    /// The API's address and the metrics endpoint's, as the process logged them.
    pub api: SocketAddr,
    pub metrics: SocketAddr,
    pub log: PathBuf,
}

impl ServeProcess {
    /// Starts a coordinator on `db` and `nats` with the tests' token secret;
    /// `env` adds or overrides variables. The log goes to `log`.
    pub async fn start(db: &TestDb, nats: &NatsServer, log: &Path, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let child = Command::new(workspace_bin("sluice")?)
            .args(["serve", "--listen", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"])
            .env("SLUICE_DATABASE_URL", db.app_url("sluice_coordinator"))
            .env("SLUICE_NATS_URL", nats.url())
            .env("SLUICE_TOKEN_SECRET_FILE", token_secret_file())
            .env("SLUICE_PRICES_FILE", concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prices.toml"))
            .env("SLUICE_LOG", "info")
            .env("SLUICE_LOG_FORMAT", "json")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()?;
        let mut process =
            ServeProcess { child, api: ([0, 0, 0, 0], 0).into(), metrics: ([0, 0, 0, 0], 0).into(), log: log.into() };
        process.api = logged_addr(log, "coordinator listening").await?;
        process.metrics = logged_addr(log, "metrics endpoint listening").await?;
        Ok(process)
    }

    /// The API's base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.api)
    }

    /// A client of this coordinator's API with `token`.
    pub fn client(&self, token: &str) -> coordinator::client::Client {
        coordinator::client::Client::new(&self.url()).with_token(token)
    }

    /// What `/readyz` answers (with 200 or 503), or `None` when nothing answers.
    pub async fn readiness(&self) -> Option<coordinator::api::Readiness> {
        readiness(&self.url()).await
    }

    /// Kills the process outright (SIGKILL), as a node failure does.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Freezes the process (SIGSTOP), as a paused VM or a long GC pause would:
    /// it keeps its sockets and its state, and runs nothing until [`thaw`].
    ///
    /// [`thaw`]: ServeProcess::thaw
    pub fn freeze(&self) -> anyhow::Result<()> {
        self.signal("-STOP")
    }

    /// Lets a frozen process run again (SIGCONT).
    pub fn thaw(&self) -> anyhow::Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill").args([signal, &self.child.id().to_string()]).status()?;
        anyhow::ensure!(status.success(), "kill {signal} failed");
        Ok(())
    }

    /// Asks the process to stop (SIGTERM), as Kubernetes does, and waits for it.
    pub fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.signal("-TERM")?;
        Ok(self.child.wait()?)
    }
}

/// What `/readyz` at `base_url` answers (with 200 or 503), or `None` when nothing answers.
pub async fn readiness(base_url: &str) -> Option<coordinator::api::Readiness> {
    let response = reqwest::get(format!("{base_url}/readyz")).await.ok()?;
    response.json().await.ok()
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A worker in its own process, for tests that kill it.
pub struct WorkerProcess {
    pub child: Child,
}

impl WorkerProcess {
    pub fn spawn(config: &worker::WorkerConfig, name: &str) -> anyhow::Result<Self> {
        Self::spawn_with(config, name, &[])
    }

    /// Like [`WorkerProcess::spawn`], with extra environment variables.
    pub fn spawn_with(config: &worker::WorkerConfig, name: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::spawn_logged(config, name, env, None)
    }

    /// Like [`WorkerProcess::spawn_with`], writing the worker's log (stderr) to `log`.
    pub fn spawn_logged(
        config: &worker::WorkerConfig,
        name: &str,
        env: &[(&str, &str)],
        log: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let stderr = match log {
            Some(path) => Stdio::from(std::fs::File::create(path)?),
            None => Stdio::inherit(),
        };
        let child = Command::new(workspace_bin("sluice-worker")?)
            .stderr(stderr)
            // Every setting of the in-process workers, so both kinds behave alike.
            .envs(config.to_env())
            .env("SLUICE_WORKER_NAME", name)
            .env("SLUICE_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .spawn()?;
        Ok(WorkerProcess { child })
    }

    /// Kills the process with SIGKILL: no ack, no cleanup.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
