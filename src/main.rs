//! The `wsgate` binary: command line, config loading, runtime, signals, exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use wsgate::config::Config;
use wsgate::observe::{
    self,
    access_log::{AccessLog, Sink},
};

/// `EX_USAGE`: the configuration could not be used.
const EXIT_CONFIG: u8 = 64;
/// A second stop signal cut the drain short: connections were dropped, not drained.
const EXIT_FORCED: u8 = 1;
const DEFAULT_CONFIG: &str = "conf/wsgate.yaml";

const USAGE: &str = "usage: wsgate [--config FILE] [--check] [--takeover] [--version]
       wsgate proxy --listen IP:PORT --to HOST:PORT [--tls-self-signed] [--admin IP:PORT] [--print-config] [--takeover]
  --config FILE      configuration file (default conf/wsgate.yaml)
  --check            validate the configuration and exit 0 (valid) or 1 (invalid)
  --takeover         start even though another process (an older wsgate) listens on the
                     same address: both share it (SO_REUSEPORT) until the old one is
                     stopped; used for zero-downtime restarts (or WSGATE_TAKEOVER=1)
  --version          print the version and exit
proxy: one route (every path) from --listen to the backend --to, with the default limits
  --tls-self-signed  serve wss:// with a certificate of the local development CA
  --admin IP:PORT    serve /healthz, /readyz and /metrics there (default: none)
  --print-config     print the equivalent configuration file and exit";

/// Where the configuration comes from: a file, or the command line (`wsgate proxy`).
enum Source {
    File(PathBuf),
    Proxy { yaml: String },
}

impl Source {
    fn name(&self) -> String {
        match self {
            Source::File(path) => path.display().to_string(),
            Source::Proxy { .. } => "(wsgate proxy)".to_owned(),
        }
    }

    fn load(&self) -> Result<Config, wsgate::config::ConfigErrors> {
        match self {
            Source::File(path) => Config::load(path),
            Source::Proxy { yaml } => Config::from_yaml_str(yaml, &self.name()),
        }
    }

    /// The YAML text, for comparing routes across a reload.
    fn text(&self) -> Option<String> {
        match self {
            Source::File(path) => std::fs::read_to_string(path).ok(),
            Source::Proxy { yaml } => Some(yaml.clone()),
        }
    }
}

struct Args {
    source: Source,
    check: bool,
    takeover: bool,
}

/// `Ok(None)`: done already (`--version`, `--help`, `--print-config`).
fn parse_args() -> Result<Option<Args>, String> {
    let mut it = std::env::args_os().skip(1).peekable();
    if it.peek().and_then(|a| a.to_str()) == Some("proxy") {
        it.next();
        return parse_proxy(it);
    }
    let mut args = Args {
        source: Source::File(PathBuf::from(DEFAULT_CONFIG)),
        check: false,
        takeover: false,
    };
    while let Some(arg) = it.next() {
        match arg.to_str() {
            Some("--config" | "-c") => {
                args.source = Source::File(it.next().ok_or("--config needs a file")?.into())
            }
            Some("--check" | "-t") => args.check = true,
            Some("--takeover") => args.takeover = true,
            Some("--version" | "-V") => {
                println!("wsgate {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            Some("--help" | "-h") => {
                println!("{USAGE}");
                return Ok(None);
            }
            _ => return Err(format!("unknown argument {}", arg.to_string_lossy())),
        }
    }
    Ok(Some(args))
}

/// `wsgate proxy ...`: the configuration is built from the flags.
fn parse_proxy(it: impl Iterator<Item = std::ffi::OsString>) -> Result<Option<Args>, String> {
    let mut it = it;
    let (mut listen, mut to, mut admin) = (None, None, None);
    let (mut tls, mut print, mut takeover) = (false, false, false);
    while let Some(arg) = it.next() {
        let mut value = |flag: &str| -> Result<String, String> {
            it.next()
                .and_then(|v| v.into_string().ok())
                .ok_or(format!("{flag} needs a value"))
        };
        match arg.to_str() {
            Some("--listen" | "--from") => listen = Some(value("--listen")?),
            Some("--to") => to = Some(value("--to")?),
            Some("--admin") => admin = Some(value("--admin")?),
            Some("--tls-self-signed") => tls = true,
            Some("--print-config") => print = true,
            Some("--takeover") => takeover = true,
            Some("--help" | "-h") => {
                println!("{USAGE}");
                return Ok(None);
            }
            _ => return Err(format!("unknown argument {}", arg.to_string_lossy())),
        }
    }
    let listen = listen.ok_or("wsgate proxy needs --listen IP:PORT")?;
    let to = to.ok_or("wsgate proxy needs --to HOST:PORT (the backend)")?;
    for (flag, v) in [("--listen", &listen), ("--to", &to)]
        .into_iter()
        .chain(admin.as_ref().map(|a| ("--admin", a)))
    {
        if v.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(format!("{flag}: {v:?} holds spaces or control characters"));
        }
    }
    let yaml = proxy_yaml(&listen, &to, tls, admin.as_deref());
    // Checked before printing or running, and told in terms of the flags the user typed.
    if let Err(errors) = Config::from_yaml_str(&yaml, "(wsgate proxy)") {
        return Err(errors
            .0
            .iter()
            .map(|e| format!("{}: {}", proxy_flag(&e.path), e.message))
            .collect::<Vec<_>>()
            .join("\n"));
    }
    if print {
        print!("{yaml}");
        return Ok(None);
    }
    Ok(Some(Args {
        source: Source::Proxy { yaml },
        check: false,
        takeover,
    }))
}

/// The flag of `wsgate proxy` that set the key at `path` of its configuration.
fn proxy_flag(path: &str) -> &'static str {
    if path.starts_with("listeners") {
        "--listen"
    } else if path.starts_with("admin") {
        "--admin"
    } else if path.starts_with("upstreams") {
        "--to"
    } else {
        "wsgate proxy"
    }
}

/// The configuration `wsgate proxy` runs: one listener, one backend, one route for every
/// path, every limit at its default.
fn proxy_yaml(listen: &str, to: &str, tls: bool, admin: Option<&str>) -> String {
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut yaml = format!(
        "# What `wsgate proxy --listen {listen} --to {to}{}` runs; every other key has its\n\
         # default (docs/configuration.md).\nlisteners:\n  - name: proxy\n    bind: {}\n",
        if tls { " --tls-self-signed" } else { "" },
        quote(listen)
    );
    if tls {
        yaml.push_str(
            "    tls: { self_signed: true }   # a certificate of the local development CA\n",
        );
    }
    if let Some(admin) = admin {
        yaml.push_str(&format!("admin:\n  bind: {}\n", quote(admin)));
    }
    yaml.push_str(&format!(
        "upstreams:\n  backend:\n    backends: [{}]\nroutes:\n  - name: proxy\n    match: {{ path_prefix: / }}\n    upstream: backend\n",
        quote(to)
    ));
    yaml
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsgate: {e}\n{USAGE}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut config = match args.source.load() {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("wsgate: configuration {} is invalid", args.source.name());
            return ExitCode::from(if args.check { 1 } else { EXIT_CONFIG });
        }
    };
    if args.check {
        for warning in &config.warnings {
            eprintln!("warning: {warning}");
        }
        println!("wsgate: configuration {} is valid", args.source.name());
        return ExitCode::SUCCESS;
    }
    observe::init_tracing(&config.log.format);
    // Before anything is written (the development CA): a refused start leaves no trace.
    // `WSGATE_TAKEOVER=1` does what `--takeover` does, for service managers whose command
    // line is fixed (a systemd template's second instance).
    let takeover = args.takeover || std::env::var("WSGATE_TAKEOVER").is_ok_and(|v| v == "1");
    if let Err(e) = check_not_taken(&config, takeover) {
        tracing::error!("{e}");
        return ExitCode::FAILURE;
    }
    let dev_ca = match dev_ca_for(&config) {
        Some(Ok((path, created))) => match args.source.load() {
            // Loaded again: the development certificates are now signed by the CA.
            Ok(signed) => {
                config = signed;
                Some((path, created))
            }
            Err(errors) => {
                tracing::error!("{errors}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        Some(Err(e)) => {
            tracing::warn!("development CA: {e}; serving a self-signed certificate instead");
            None
        }
        None => None,
    };
    let runtime = match build_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wsgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (code, access) = runtime.block_on(serve(config, args.source, dev_ca));
    // Connections still open at `drain.timeout` are cut here (each logs its line), then
    // the access log is written out before the process ends.
    runtime.shutdown_timeout(EXIT_GRACE);
    if let Some(access) = access {
        access.flush(EXIT_GRACE);
    }
    code
}

/// The development CA, found or made, when a listener serves `self_signed` certificates.
fn dev_ca_for(config: &Config) -> Option<Result<(PathBuf, bool), String>> {
    let wanted = config
        .listeners
        .iter()
        .any(|l| l.tls.as_ref().is_some_and(|t| t.self_signed));
    wanted.then(|| wsgate::devca::prepare(&wsgate::devca::default_dir()))
}

/// Refuses to share a listener's address with another live process unless `--takeover`:
/// SO_REUSEPORT would silently split connections (and `/metrics` scrapes) between them.
fn check_not_taken(config: &Config, takeover: bool) -> Result<(), String> {
    let admin = config.admin.iter().map(|a| ("admin".to_owned(), a.bind));
    let listeners = config.listeners.iter().map(|l| (l.name.clone(), l.bind));
    for (name, addr) in listeners.chain(admin) {
        if addr.port() == 0 || !wsgate::listener::listened_on(addr) {
            continue;
        }
        if takeover {
            tracing::warn!(listener = %name, %addr, "--takeover: sharing the address with the process already listening there (SO_REUSEPORT); stop that one (SIGTERM) to finish the restart");
            continue;
        }
        return Err(wsgate::listener::taken_message(&name, addr));
    }
    Ok(())
}

/// How long exit waits for cut connections and the access log.
const EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// One worker per CPU this process may run on. Pinned to a single CPU, a current-thread
/// runtime does the same work without the hand-offs between a worker and the I/O driver.
fn build_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Runtime::new()
    }
}

async fn serve(
    config: Config,
    source: Source,
    dev_ca: Option<(PathBuf, bool)>,
) -> (ExitCode, Option<AccessLog>) {
    // Installed before start-up, which can wait seconds on DNS: a signal then must not
    // meet its default action (a SIGHUP from a service manager would kill the process).
    let Some(mut signals) = Signals::install() else {
        tracing::error!("cannot install signal handlers");
        return (ExitCode::FAILURE, None);
    };
    let sink = Sink::Target(config.log.access.clone());
    let gateway = tokio::select! {
        started = wsgate::start(config, sink) => match started {
            Ok(g) => g,
            Err(e) => {
                tracing::error!("{e}");
                return (ExitCode::FAILURE, None);
            }
        },
        _ = signals.stop() => {
            tracing::info!("stop signal during start-up: exiting");
            return (ExitCode::SUCCESS, None);
        }
    };
    if let Ok(mut text) = source_text_cache().lock() {
        *text = source.text();
    }
    announce(&gateway, dev_ca.as_ref());
    loop {
        match signals.next().await {
            Signal::Stop => break,
            // A reload waiting on DNS must not hold up a stop.
            Signal::Reload => tokio::select! {
                _ = reload(&gateway, &source) => {}
                _ = signals.stop() => break,
            },
            Signal::Reopen => gateway.shared.access.reopen(),
        }
    }
    // A second SIGTERM/SIGINT during the drain means "now": connections are cut, so the
    // exit status says the shutdown was not clean.
    let code = tokio::select! {
        _ = gateway.drain() => ExitCode::SUCCESS,
        _ = signals.stop() => {
            tracing::warn!("second stop signal: exiting without waiting (exit status {EXIT_FORCED})");
            ExitCode::from(EXIT_FORCED)
        }
    };
    tracing::info!("exiting");
    (code, Some(gateway.shared.access.clone()))
}

/// The start-up lines a newcomer needs: a URL to try on each listener (the first route
/// that names no host) and, with the development CA, where it is and how to trust it.
fn announce(gateway: &wsgate::Gateway, dev_ca: Option<&(PathBuf, bool)>) {
    let config = gateway.shared.config.load();
    let route = config.routes.iter().find(|r| r.host.is_none());
    let mut wss_url = None;
    for ((name, addr), l) in gateway.listeners.iter().zip(&config.listeners) {
        let tls = l.tls.is_some();
        // The certificate of a development listener names localhost, not 127.0.0.1.
        let host = match (addr.ip(), tls) {
            (_, true) if addr.ip().is_loopback() || addr.ip().is_unspecified() => {
                "localhost".to_owned()
            }
            (ip, _) if ip.is_unspecified() => "127.0.0.1".to_owned(),
            (std::net::IpAddr::V6(ip), _) => format!("[{ip}]"),
            (ip, _) => ip.to_string(),
        };
        let Some(route) = route else { continue };
        let scheme = if tls { "wss" } else { "ws" };
        let url = format!("{scheme}://{host}:{}{}", addr.port(), route.path_prefix);
        if l.proxy_protocol {
            continue;
        }
        tracing::info!(listener = %name, "try it: python3 -m websockets {url}");
        if tls && wss_url.is_none() {
            wss_url = Some(url);
        }
    }
    if let (Some((path, created)), Some(url)) = (dev_ca, wss_url) {
        let state = if *created { "created now" } else { "reused" };
        tracing::info!(
            "development CA ({state}): {}; {}",
            path.display(),
            wsgate::devca::trust_recipe(path, &url)
        );
    }
}

enum Signal {
    Stop,
    Reload,
    Reopen,
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Option<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Some(Signals {
            term: signal(SignalKind::terminate()).ok()?,
            int: signal(SignalKind::interrupt()).ok()?,
            hup: signal(SignalKind::hangup()).ok()?,
            usr1: signal(SignalKind::user_defined1()).ok()?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
            _ = self.hup.recv() => Signal::Reload,
            _ = self.usr1.recv() => Signal::Reopen,
        }
    }

    async fn stop(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// SIGHUP: re-reads and validates the config, certificates included, then applies it. A
/// config that does not load changes nothing.
async fn reload(gateway: &wsgate::Gateway, source: &Source) {
    let before = source_text_cache().lock().ok().and_then(|t| t.clone());
    let after = source.text();
    match source.load().and_then(|c| first_dev_ca(c, source)) {
        Ok(config) => {
            for warning in &config.warnings {
                tracing::warn!("{warning}");
            }
            let routes = route_changes(before.as_deref(), after.as_deref());
            let done = gateway.reload(config).await;
            tracing::info!(
                routes_added = ?routes.added,
                routes_changed = ?routes.changed,
                routes_removed = ?routes.removed,
                bound = ?done.bound,
                closed = ?done.closed,
                certificates = ?done.certificates,
                drained = done.drained,
                "configuration reloaded"
            );
            if !done.need_restart.is_empty() {
                tracing::warn!(keys = ?done.need_restart, "these settings changed but apply only after a restart");
            }
            if let Ok(mut text) = source_text_cache().lock() {
                *text = after;
            }
        }
        Err(errors) => {
            gateway.shared.metrics.reload_failed();
            for e in &errors.0 {
                tracing::error!("{e}");
            }
            tracing::error!(
                "reload refused: {} is invalid; the running configuration stays in service",
                source.name()
            );
        }
    }
}

/// On reload, the first `self_signed` listener brings the development CA (made or found
/// as at start-up), and the config is loaded again so that its certificate is signed by
/// it: a client trusting `dev-ca.crt` then trusts that listener too.
fn first_dev_ca(config: Config, source: &Source) -> Result<Config, wsgate::config::ConfigErrors> {
    if wsgate::tls::dev_ca().is_some() {
        return Ok(config);
    }
    match dev_ca_for(&config) {
        Some(Ok((path, created))) => {
            let signed = source.load()?;
            let state = if created { "created now" } else { "reused" };
            let port = signed
                .listeners
                .iter()
                .find(|l| l.tls.as_ref().is_some_and(|t| t.self_signed))
                .map_or(0, |l| l.bind.port());
            let url = format!("wss://localhost:{port}/");
            tracing::info!(
                "development CA ({state}): {}; {}",
                path.display(),
                wsgate::devca::trust_recipe(&path, &url)
            );
            Ok(signed)
        }
        Some(Err(e)) => {
            tracing::warn!("development CA: {e}; serving a self-signed certificate instead");
            Ok(config)
        }
        None => Ok(config),
    }
}

/// The text of the configuration in service, to name what a reload changes.
fn source_text_cache() -> &'static std::sync::Mutex<Option<String>> {
    static TEXT: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
    &TEXT
}

/// Route names added, changed (any key of the route's YAML differs) and removed.
#[derive(Default)]
struct RouteChanges {
    added: Vec<String>,
    changed: Vec<String>,
    removed: Vec<String>,
}

fn route_changes(before: Option<&str>, after: Option<&str>) -> RouteChanges {
    let routes = |text: Option<&str>| -> Vec<(String, serde_norway::Value)> {
        let Some(doc) = text.and_then(|t| serde_norway::from_str::<serde_norway::Value>(t).ok())
        else {
            return Vec::new();
        };
        let Some(list) = doc.get("routes").and_then(|r| r.as_sequence()) else {
            return Vec::new();
        };
        list.iter()
            .map(|r| {
                let name = r
                    .get("name")
                    .and_then(|n| n.as_str())
                    .unwrap_or("")
                    .to_owned();
                (name, r.clone())
            })
            .collect()
    };
    let (old, new) = (routes(before), routes(after));
    let mut changes = RouteChanges::default();
    for (name, route) in &new {
        match old.iter().find(|(n, _)| n == name) {
            None => changes.added.push(name.clone()),
            Some((_, was)) if was != route => changes.changed.push(name.clone()),
            Some(_) => {}
        }
    }
    for (name, _) in &old {
        if !new.iter().any(|(n, _)| n == name) {
            changes.removed.push(name.clone());
        }
    }
    changes
}
