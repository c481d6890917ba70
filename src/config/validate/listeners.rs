//! `listeners` and `log`: bind addresses, unique names and binds, access-log target and
//! log format. A listener's `tls` block is checked in [`super::tls`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use super::Validator;
use crate::config::file::{DEFAULT_LOG_ACCESS, DEFAULT_LOG_FORMAT, FileListener, FileLog};
use crate::config::units::Text;
use crate::config::{AccessTarget, KeyPath, Listener, Log, LogFormat};

impl Validator<'_> {
    pub(super) fn listeners(&mut self, file: Vec<FileListener>, path: &KeyPath) -> Vec<Listener> {
        if file.is_empty() {
            self.issue(
                path,
                "at least one listener is required, e.g. `listeners: [{ bind: \"0.0.0.0:8080\" }]`"
                    .into(),
            );
        }
        let mut listeners: Vec<Listener> = Vec::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut binds: HashMap<SocketAddr, usize> = HashMap::new();
        for (i, listener) in file.into_iter().enumerate() {
            let path = path.index(i);
            let tls = listener
                .tls
                .and_then(|t| self.listener_tls(t, &path.key("tls")));
            let proxy_protocol = listener.proxy_protocol.unwrap_or(false);
            let http2 = listener.http2.unwrap_or(tls.is_some());
            let tls = tls.map(|t| if http2 { t.offering_h2() } else { t });
            let Some(bind) = self.socket_addr(&listener.bind, &path.key("bind")) else {
                continue;
            };
            let (name, name_path) = match &listener.name {
                Some(name) => match self.non_empty(name, &path.key("name"), "listener name") {
                    Some(name) => (name, path.key("name")),
                    None => continue,
                },
                None => (bind.to_string(), path.key("bind")),
            };
            // Port 0 asks the OS for a fresh port, so it never collides.
            if let Some(first) = binds.get(&bind).filter(|_| bind.port() != 0) {
                self.issue(
                    &path.key("bind"),
                    format!("bind address {bind} is already used by listeners[{first}]; each listener needs its own address"),
                );
            } else {
                binds.insert(bind, i);
            }
            if let Some(first) = names.get(&name) {
                self.issue(
                    &name_path,
                    format!("listener name `{name}` is already used by listeners[{first}]; names must be unique"),
                );
            } else {
                names.insert(name.clone(), i);
            }
            listeners.push(Listener {
                name,
                bind,
                tls,
                proxy_protocol,
                http2,
            });
        }
        listeners
    }

    pub(super) fn log(&mut self, file: Option<FileLog>, path: &KeyPath) -> Log {
        let (access, format) = file.map(|l| (l.access, l.format)).unwrap_or_default();
        let access_text = access.unwrap_or_else(|| Text::literal(DEFAULT_LOG_ACCESS));
        let access = match access_text.value.trim() {
            "stdout" => AccessTarget::Stdout,
            "stderr" => AccessTarget::Stderr,
            "" => {
                self.issue(
                    &path.key("access"),
                    "log.access must not be empty; use stdout, stderr or a file path".into(),
                );
                AccessTarget::Stdout
            }
            file => AccessTarget::File(PathBuf::from(file)),
        };
        let format_text = format.unwrap_or_else(|| Text::literal(DEFAULT_LOG_FORMAT));
        let format = match format_text.value.trim() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => {
                self.issue(
                    &path.key("format"),
                    format!(
                        "unknown log format {}; use text or json",
                        format_text.shown()
                    ),
                );
                LogFormat::Text
            }
        };
        Log { access, format }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    #[test]
    fn log_targets_and_formats_parse() {
        let config = load(&with(
            "log: { access: /var/log/wsgate.log, format: json }\n",
        ))
        .unwrap();
        assert_eq!(
            config.log.access,
            AccessTarget::File("/var/log/wsgate.log".into())
        );
        assert_eq!(config.log.format, LogFormat::Json);
    }

    #[test]
    fn duplicate_listener_names_and_binds_are_refused() {
        let text = MINIMAL.replace(
            "  - bind: 127.0.0.1:8080\n",
            "  - { name: a, bind: 127.0.0.1:8080 }\n  - { name: a, bind: 127.0.0.1:8081 }\n  - { name: b, bind: 127.0.0.1:8080 }\n",
        );
        let errors = errors_of(&text);
        let got: Vec<(&str, usize)> = errors.iter().map(|e| (e.path.as_str(), e.line)).collect();
        assert_eq!(
            got,
            [("listeners[1].name", 3), ("listeners[2].bind", 4)],
            "{errors:#?}"
        );
    }
}
