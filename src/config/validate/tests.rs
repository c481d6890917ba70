//! Whole-pipeline tests of validation: defaults, the shipped example files, error
//! positions and display, `${NAME}` substitution, and never panicking on any text.

use super::testing::*;
use super::*;
use crate::config::{AccessTarget, Backend, Keepalive, LogFormat, UpstreamKind};
use proptest::prelude::*;

#[test]
fn minimal_config_gets_every_default() {
    let config = load(MINIMAL).unwrap();
    assert_eq!(config.listeners[0].name, "127.0.0.1:8080");
    assert!(config.admin.is_none());
    assert_eq!(config.log.access, AccessTarget::Stdout);
    assert_eq!(config.log.format, LogFormat::Text);
    let want = Limits {
        max_connections: 50_000,
        max_pending_handshakes: 4096,
        handshake_timeout: Duration::from_secs(10),
        max_frame_size: 1 << 20,
        max_message_size: 4 << 20,
        send_timeout: Duration::from_secs(30),
        buffer_size: 16 << 10,
        messages: MessageRate {
            rate: std::num::NonZeroU32::new(100).unwrap(),
            per: Duration::from_secs(1),
            burst: std::num::NonZeroU32::new(200).unwrap(),
            on_exceed: OnExceed::Close,
        },
        max_fragments: 256,
        fragment_timeout: Duration::from_secs(10),
        idle_timeout: Duration::ZERO,
        max_connection_age: Duration::ZERO,
        max_connections_per_ip: 64,
        max_connections_per_subject: 0,
        ipv6_prefix: 64,
        max_request_body: 1 << 20,
        http_timeout: Duration::from_secs(60),
        handshakes_per_ip: RatePolicy {
            rate: 10,
            per: Duration::from_secs(1),
            burst: 20,
        },
    };
    assert_eq!(config.limits, want);
    assert_eq!(
        config.keepalive,
        Keepalive {
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(10),
            upstream_ping_interval: Duration::ZERO,
        }
    );
    assert_eq!(config.routes[0].limits, want);
    let upstream = &config.upstreams["echo"];
    assert_eq!(upstream.kind, UpstreamKind::BuiltinEcho);
    assert_eq!(upstream.connect_timeout, Duration::from_secs(3));
    assert!(Arc::ptr_eq(upstream, &config.routes[0].upstream));
}

#[test]
fn default_config_file_loads() {
    let config = load(include_str!("../../../conf/wsgate.yaml")).unwrap();
    assert_eq!(config.listeners[0].name, "public");
    assert_eq!(
        config.admin.unwrap().bind,
        "127.0.0.1:9090".parse().unwrap()
    );
    assert_eq!(config.routes[0].path_prefix, "/echo");
    assert_eq!(config.routes[0].upstream.kind, UpstreamKind::BuiltinEcho);
}

#[test]
fn full_example_file_loads() {
    let config = Config::from_yaml_str_with_env(
        include_str!("../../../conf/example-full.yaml"),
        "example-full.yaml",
        &|_| None,
    )
    .unwrap();
    assert!(config.routes.len() >= 2);
    assert!(config.upstreams.len() >= 2);
}

/// The SPEC §2 example uses every key. Every key must be recognised (no unknown-field
/// error), and the only complaints must be about its certificate and JWKS files, which
/// this repository does not ship.
#[test]
fn spec_example_fails_only_on_files_this_repository_lacks() {
    let errors = Config::from_yaml_str_with_env(
        include_str!("../testdata/spec-section-2.yaml"),
        "spec.yaml",
        &|name| (name == "JWT_SECRET").then(|| "s3cret".to_string()),
    )
    .unwrap_err()
    .0;
    for e in &errors {
        let missing_file = e
            .message
            .contains("cannot read certificates from certs/example.crt")
            || e.message.contains("cannot read JWKS file certs/jwks.json");
        assert!(missing_file, "{e}");
        assert!(e.line > 0 && !e.to_string().contains("s3cret"), "{e}");
    }
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "listeners[0].tls.certificates[0].cert",
            "routes[0].auth.jwt.keys[1].jwks_file",
        ]
    );
}

#[test]
fn env_variables_fill_any_string_value() {
    let text = "\
listeners:
  - bind: \"0.0.0.0:${PORT}\"
limits: { send_timeout: \"${TIMEOUT}\" }
upstreams:
  chat: { backends: [{ addr: \"${BACKEND}\" }] }
routes:
  - { name: chat, match: { path_prefix: /chat, host: Chat.Example.COM }, upstream: chat }
";
    let config = load(text).unwrap();
    assert_eq!(config.listeners[0].bind, "0.0.0.0:8443".parse().unwrap());
    assert_eq!(config.limits.send_timeout, Duration::from_secs(7));
    assert_eq!(
        config.upstreams["chat"].kind,
        UpstreamKind::Backends(vec![Backend {
            addr: "10.0.0.7:9001".into(),
            weight: 1
        }])
    );
    assert_eq!(config.routes[0].host.as_deref(), Some("chat.example.com"));
}

#[test]
fn env_values_cannot_inject_yaml_structure() {
    let text = MINIMAL.replace("name: echo", "name: \"${INJECT}\"");
    let config =
        Config::from_yaml_str_with_env(&text, "t", &|_| Some("x\nupstream: evil\n  - [".into()))
            .unwrap();
    assert_eq!(config.routes[0].name, "x\nupstream: evil\n  - [");
}

#[test]
fn explicitly_off_values_are_accepted() {
    let text = with(
            "trusted_proxies: []\ndrain: null\nkeepalive: { ping_interval: 0s, pong_timeout: 10s, upstream_ping_interval: 0s }\nlimits: { idle_timeout: 0s }\n",
        )
        .replace(
            "  - bind: 127.0.0.1:8080\n",
            "  - bind: 127.0.0.1:8080\n    tls: null\n    proxy_protocol: false\n",
        );
    load(&text).unwrap();
}

#[test]
fn unknown_key_is_located_and_named() {
    let text = MINIMAL.replace("  - bind:", "  - tsl: x\n    bind:");
    assert_one_error(&text, "listeners[0].tsl", 2, 5, "unknown field `tsl`");
}

#[test]
fn unknown_top_level_key_is_named() {
    assert_one_error(&with("limts: {}\n"), "limts", 9, 1, "unknown field `limts`");
}

#[test]
fn bad_duration_is_located() {
    assert_one_error(
        &with("limits:\n  send_timeout: 30\n"),
        "limits.send_timeout",
        10,
        17,
        "needs a unit",
    );
}

#[test]
fn bad_size_is_located() {
    assert_one_error(
        &with("limits: { buffer_size: 16Kb }\n"),
        "limits.buffer_size",
        9,
        24,
        "unknown size unit",
    );
}

#[test]
fn missing_env_var_is_located_and_named() {
    let text = MINIMAL.replace(
        "bind: 127.0.0.1:8080",
        "bind: \"127.0.0.1:${NO_SUCH_PORT}\"",
    );
    assert_one_error(
        &text,
        "listeners[0].bind",
        2,
        11,
        "`NO_SUCH_PORT` is not set",
    );
}

#[test]
fn missing_env_var_inside_a_duration_is_located() {
    assert_one_error(
        &with("limits: { send_timeout: \"${NOPE}\" }\n"),
        "limits.send_timeout",
        9,
        25,
        "`NOPE` is not set",
    );
}

#[test]
fn type_error_is_located() {
    let text = MINIMAL.replace(
        "  echo: { builtin: echo }",
        "  echo: { builtin: echo, connect_timeout: [1] }",
    );
    let e = &errors_of(&text)[0];
    assert_eq!(
        (e.path.as_str(), e.line),
        ("upstreams.echo.connect_timeout", 4),
        "{e}"
    );
}

#[test]
fn yaml_syntax_error_has_a_position() {
    let e = &errors_of("listeners: [\n  - {")[0];
    assert!(e.line > 0 && e.column > 0, "{e}");
    let e = &errors_of("log: {}\n---\nlog: {}\n")[0];
    assert_eq!((e.line, e.column), (3, 1), "{e}");
    assert!(e.message.contains("more than one YAML document"), "{e}");
}

#[test]
fn display_is_file_line_column_path_message() {
    let text = with("limits: { buffer_size: 100 }\n");
    let shown = load(&text).unwrap_err().to_string();
    assert!(
        shown.starts_with("test.yaml:9:24: limits.buffer_size: buffer_size 100B is out of range"),
        "{shown}"
    );
}

#[test]
fn every_problem_is_reported_not_just_the_first() {
    let text = with("limits: { buffer_size: 2MiB, send_timeout: 0s }\nadmin: { bind: nope }\n");
    let errors = errors_of(&text);
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        ["limits.buffer_size", "limits.send_timeout", "admin.bind"],
        "{errors:#?}"
    );
}

#[test]
fn at_least_one_listener_and_route_are_required() {
    let errors = errors_of("upstreams: { echo: { builtin: echo } }\n");
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["listeners", "routes"]);
    assert!(errors.iter().all(|e| e.line == 1 && e.column == 1));
    assert_eq!(errors_of("").len(), 2);
}

/// SPEC §2: `${NAME}` works in every value, numbers and booleans written as strings
/// included; a bad one is reported by its template, never by the value.
#[test]
fn numbers_and_booleans_may_come_from_the_environment() {
    let env = |name: &str| match name {
        "CONNS" => Some("7".to_string()),
        "PROXY" => Some(" true ".to_string()),
        "LOAD" => Some("1.5".to_string()),
        "SECRET" => Some("hunter2".to_string()),
        _ => None,
    };
    let text = MINIMAL
            .replace(
                "  - bind: 127.0.0.1:8080",
                "  - { bind: 127.0.0.1:8080, proxy_protocol: \"${PROXY}\" }",
            )
            .replace(
                "echo: { builtin: echo }",
                "echo: { backends: [{ addr: \"a:1\", weight: \"${CONNS}\" }], balance: { bounded_load: \"${LOAD}\" } }",
            )
            + "limits: { max_connections: \"${CONNS}\", messages: { rate: \"${CONNS}\", per: 1s } }\n";
    let config =
        Config::from_yaml_str_with_env(&text, "test.yaml", &env).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.limits.max_connections, 7);
    assert_eq!(config.limits.messages.rate.get(), 7);
    assert!(config.listeners[0].proxy_protocol);
    assert_eq!(config.upstreams["echo"].bounded_load, Some(1.5));
    for bad in [
        with("limits: { max_connections: \"${SECRET}\" }\n"),
        with("limits: { max_connections_per_ip: \"-${CONNS}\" }\n"),
        MINIMAL.replace(
            "  - bind: 127.0.0.1:8080",
            "  - { bind: 127.0.0.1:8080, proxy_protocol: \"${SECRET}\" }",
        ),
    ] {
        let shown = Config::from_yaml_str_with_env(&bad, "test.yaml", &env)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(shown.contains("(from the environment) is not"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }
    let plain = errors_of(&with("limits: { max_connections: 1.5 }\n"));
    assert_eq!(plain[0].path, "limits.max_connections");
}

#[test]
fn env_substituted_values_are_never_echoed() {
    let cases = [
        MINIMAL.replace("bind: 127.0.0.1:8080", "bind: \"${SECRET}\""),
        with("limits: { send_timeout: \"${SECRET}\" }\n"),
        with("limits: { buffer_size: \"${SECRET}\" }\n"),
        MINIMAL.replace("    upstream: echo", "    upstream: \"${SECRET}\""),
        MINIMAL.replace("path_prefix: /echo", "path_prefix: \"${SECRET}\""),
        with("log: { format: \"${SECRET}\" }\n"),
        with("trusted_proxies: [10.0.0.0/8, \"${SECRET}\"]\n"),
        MINIMAL.replace(
            "echo: { builtin: echo }",
            "echo: { backends: [{ addr: \"a:1\" }], tls: { sni: \"${SECRET} y\" } }",
        ),
    ];
    for text in cases {
        let shown = load(&text).unwrap_err().to_string();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("${SECRET}"), "{shown}");
    }
}

proptest! {
    #[test]
    fn arbitrary_text_never_panics(text in "\\PC*") {
        let _ = Config::from_yaml_str_with_env(&text, "fuzz.yaml", &|_| None);
    }

    #[test]
    fn yaml_shaped_text_never_panics(text in "[a-z_:{}\\[\\],\\-\n #$\"'0-9./&*!]{0,200}") {
        let _ = Config::from_yaml_str_with_env(&text, "fuzz.yaml", &|_| None);
    }

    #[test]
    fn mutated_valid_config_never_panics(cut in 0usize..200, insert in "[a-z:{}\\[\\] \n$0-9-]{0,6}") {
        let mut text = MINIMAL.to_string();
        let at = cut.min(text.len());
        text.insert_str(at, &insert);
        let _ = Config::from_yaml_str_with_env(&text, "fuzz.yaml", &|_| None);
    }

    #[test]
    fn errors_always_carry_a_position(text in "[a-z_:{}\\[\\]\\-\n 0-9]{1,120}") {
        if let Err(errors) = Config::from_yaml_str_with_env(&text, "fuzz.yaml", &|_| None) {
            for e in errors.0 {
                prop_assert!(e.line > 0 && e.column > 0, "{}", e);
            }
        }
    }
}
