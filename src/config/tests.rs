//! Tests of loading, validation, error locations and printing of the configuration.

use super::*;

fn err(text: &str) -> ConfigError {
    match load_str("tuning/bad.toml", text) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(error) => error,
    }
}

/// Asserts an `Invalid` error at `line` about `key` whose message contains `needle`.
fn assert_invalid(error: &ConfigError, line: usize, key: &str, needle: &str) {
    assert!(
        matches!(error, ConfigError::Invalid { .. }),
        "not Invalid: {error}"
    );
    assert_eq!(error.file(), "tuning/bad.toml", "{error}");
    assert_eq!(error.line(), Some(line), "{error}");
    assert_eq!(error.key(), Some(key), "{error}");
    assert!(
        error.to_string().contains(needle),
        "{error:?} lacks {needle:?}"
    );
}

#[test]
fn metrics_listen_is_off_by_default_and_must_be_its_own_address() {
    assert_eq!(load_str("t.toml", "").unwrap().metrics.listen, None);
    let c = load_str("t.toml", "[metrics]\nlisten = \"127.0.0.1:9100\"\n").unwrap();
    assert_eq!(c.metrics.listen, Some("127.0.0.1:9100".parse().unwrap()));
    assert_eq!(load_str("t.toml", &c.to_toml()).unwrap(), c);
    let same = "[server]\nlisten = \"127.0.0.1:8080\"\n[metrics]\nlisten = \"127.0.0.1:8080\"\n";
    assert_invalid(
        &err(same),
        4,
        "metrics.listen",
        "must differ from server.listen",
    );
    assert_invalid(
        &err("[metrics]\nlisten = \"localhost:9100\"\n"),
        2,
        "metrics.listen",
        "host names are not resolved",
    );
}

#[test]
fn defaults_load_with_documented_values() {
    let c = load(None).unwrap();
    assert_eq!(
        c.server.listen,
        "127.0.0.1:8080".parse::<std::net::SocketAddr>().unwrap()
    );
    assert_eq!(c.server.backlog, 4096);
    assert_eq!(c.shards.cores, Cores::All);
    assert_eq!(c.shards.io_memory, 256 * 1024);
    assert_eq!(c.shards.session_limit(), None);
    assert_eq!(c.http.max_header_bytes, 8192);
    assert_eq!(c.websocket.max_message_bytes, 65536);
    assert_eq!(c.websocket.ping_interval, secs(30));
    assert_eq!(c.websocket.idle_timeout, secs(75));
    assert_eq!(c.log.format, LogFormat::Auto);
    assert_eq!(c.storage.durability, Durability::Fsync);
    assert_eq!(c.storage.commit_window, ms(1));
    assert_eq!(c.storage.commit_interval, ms(3));
    assert_eq!(c.storage.apply_interval, ms(50));
    assert_eq!(c.storage.commit_nice, -10);
    assert_eq!(c.storage.map_size, GIB);
    assert_eq!(c.agents.accounts.len(), 0);
    assert_eq!(
        c.bot.handlers,
        vec![
            BotHandler::RiskControl,
            BotHandler::HumanTransfer,
            BotHandler::Intent,
            BotHandler::Fallback
        ]
    );
    assert!(!c.diagnostics.echo);
    assert!(!c.diagnostics.panic_endpoint);
    assert!(!c.diagnostics.stall_endpoint);
    assert_eq!(c, Config::default());
}

#[test]
fn every_key_in_default_toml_has_a_comment_above_it() {
    let lines: Vec<&str> = EMBEDDED_DEFAULT.lines().collect();
    let mut checked = 0;
    for (i, line) in lines.iter().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        let above = lines[..i].last().map(|l| l.trim()).unwrap_or("");
        assert!(
            above.starts_with('#'),
            "default.toml line {}: `{line}` has no comment above it",
            i + 1
        );
        checked += 1;
    }
    // Every leaf key except sections is documented.
    let leaves = known_keys()
        .iter()
        .filter(|k| k.contains('.') && *k != "agents.accounts" && *k != "visitors.sites")
        .count();
    assert_eq!(checked, leaves);
}

#[test]
fn embedded_default_missing_a_key_is_reported() {
    let without: String = EMBEDDED_DEFAULT
        .lines()
        .filter(|l| !l.starts_with("write_timeout"))
        .map(|l| format!("{l}\n"))
        .collect();
    let error = load_layers(&without, &[]).unwrap_err();
    assert_eq!(
        error.to_string(),
        "<embedded default>: key 'websocket.write_timeout': missing (every key must be present in the embedded default)"
    );
    assert_eq!(error.line(), None);
}

#[test]
fn errors_in_the_embedded_default_are_named_so() {
    let broken = EMBEDDED_DEFAULT.replace("backlog = 4096", "backlog = 0");
    let error = load_layers(&broken, &[]).unwrap_err();
    assert_eq!(error.file(), "<embedded default>");
    assert_eq!(error.key(), Some("server.backlog"));
    let expected_line = EMBEDDED_DEFAULT
        .lines()
        .position(|l| l.starts_with("backlog"))
        .unwrap()
        + 1;
    assert_eq!(error.line(), Some(expected_line));
}

#[test]
fn overlay_changes_only_the_given_keys() {
    let c = load_str(
        "over.toml",
        "[websocket]\nping_interval = \"40s\"\n\n[shards]\ncores = [1, 0]\n",
    )
    .unwrap();
    let mut expected = Config::default();
    expected.websocket.ping_interval = secs(40);
    expected.shards.cores = Cores::List(vec![1, 0]);
    assert_eq!(c, expected);
    // and it really differs from the defaults
    assert_ne!(c, Config::default());
}

#[test]
fn dotted_and_inline_tables_overlay_too() {
    let c = load_str(
        "over.toml",
        "websocket.idle_timeout = \"2m\"\nhttp = { max_headers = 64 }\n",
    )
    .unwrap();
    assert_eq!(c.websocket.idle_timeout, mins(2));
    assert_eq!(c.http.max_headers, 64);
    assert_eq!(c.http.max_header_bytes, 8192);
}

/// Dotted key → value text, from a TOML document.
fn flatten(text: &str) -> BTreeMap<String, String> {
    fn walk(prefix: &str, table: &dyn TableLike, out: &mut BTreeMap<String, String>) {
        for (key, item) in table.iter() {
            let dotted = if prefix.is_empty() {
                key.to_owned()
            } else {
                format!("{prefix}.{key}")
            };
            match item.as_table_like() {
                Some(inner) => walk(&dotted, inner, out),
                None => {
                    out.insert(dotted, item.to_string().trim().to_owned());
                }
            }
        }
    }
    let doc: toml_edit::DocumentMut = text.parse().unwrap();
    let mut out = BTreeMap::new();
    walk("", doc.as_table(), &mut out);
    out
}

#[test]
fn profiles_load_and_every_key_they_set_changes_something() {
    let defaults = flatten(&Config::default().to_toml());
    for (name, text) in [
        (
            "high-density.toml",
            include_str!("../../tuning/high-density.toml"),
        ),
        (
            "low-latency.toml",
            include_str!("../../tuning/low-latency.toml"),
        ),
        (
            "multilingual.toml",
            include_str!("../../tuning/multilingual.toml"),
        ),
    ] {
        let config = load_str(name, text).unwrap_or_else(|e| panic!("{e}"));
        let effective = flatten(&config.to_toml());
        let changed: Vec<&String> = effective
            .iter()
            .filter(|(k, v)| defaults.get(*k) != Some(*v))
            .map(|(k, _)| k)
            .collect();
        let set_by_profile: Vec<String> = flatten(text).into_keys().collect();
        assert!(!set_by_profile.is_empty(), "{name} sets nothing");
        assert_eq!(
            changed.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
            set_by_profile
                .iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>(),
            "{name}: each key a profile sets must differ from the default"
        );
    }
}

#[test]
fn unknown_section_is_named_with_its_line() {
    let e = err("[server]\nbacklog = 10\n\n[serverz]\nlisten = \"127.0.0.1:1\"\n");
    assert_invalid(
        &e,
        4,
        "serverz",
        "unknown section; valid sections are: server, shards",
    );
}

#[test]
fn unknown_nested_key_is_named_with_its_line() {
    let e = err("# comment\n[websocket]\nping_interval = \"20s\"\nping_intervall = \"30s\"\n");
    assert_invalid(
        &e,
        4,
        "websocket.ping_intervall",
        "unknown key; valid keys in [websocket] are: max_message_bytes, ping_interval",
    );
    let e = err("\nwebsocket.nope = 1\n");
    assert_invalid(&e, 2, "websocket.nope", "unknown key");
}

#[test]
fn unknown_key_inside_an_agent_account_is_named() {
    let e = err("[agents.accounts.alice]\ntoken = \"0123456789abcdef\"\nnmae = \"Alice\"\n");
    assert_invalid(
        &e,
        3,
        "agents.accounts.alice.nmae",
        "unknown key in an agent account; valid keys are: token, name, max_open",
    );
    let e = err("[agents]\naccounts = { bob = { token = \"0123456789abcdef\", x = 1 } }\n");
    assert_invalid(
        &e,
        2,
        "agents.accounts.bob.x",
        "unknown key in an agent account",
    );
}

#[test]
fn wrong_type_names_line_key_and_what_was_found() {
    let e = err("[server]\n\nbacklog = \"many\"\n");
    assert_invalid(
        &e,
        3,
        "server.backlog",
        "expected an integer, got string \"many\"",
    );
    let e = err("[diagnostics]\necho = 1\n");
    assert_invalid(
        &e,
        2,
        "diagnostics.echo",
        "expected true or false, got integer 1",
    );
    let e = err("websocket = 5\n");
    assert_invalid(&e, 1, "websocket", "expected a table, got integer 5");
    let e = err("[[server]]\nbacklog = 1\n");
    assert_invalid(&e, 1, "server", "expected a table, got an array of tables");
    let e = err("[websocket.ping_interval]\n");
    assert_invalid(&e, 1, "websocket.ping_interval", "got a table");
    let e = err("[risk_control]\nblocked_words = [\"ok\",\n  7]\n");
    assert_invalid(
        &e,
        3,
        "risk_control.blocked_words",
        "element 2: expected a string, got integer 7",
    );
}

#[test]
fn out_of_range_message_is_exact() {
    let text = "# line 1\n\n\n\n\n[websocket]\nmax_message_bytes = 10\n";
    assert_eq!(
        err(text).to_string(),
        "tuning/bad.toml:7: key 'websocket.max_message_bytes': must be between 125 and 67108864, got 10"
    );
    let e = err("[websocket]\nmax_message_bytes = \"128MiB\"\n");
    assert_invalid(
        &e,
        2,
        "websocket.max_message_bytes",
        "must be between 125 and 64MiB, got \"128MiB\"",
    );
    let e = err("[server]\nbacklog = -1\n");
    assert_invalid(
        &e,
        2,
        "server.backlog",
        "must be between 1 and 65535, got -1",
    );
    let e = err("[bot]\nconfidence_threshold = 1.5\n");
    assert_invalid(
        &e,
        2,
        "bot.confidence_threshold",
        "between 0.0 and 1.0, got 1.5",
    );
    let e = err("[bot]\nmargin_threshold = nan\n");
    assert_invalid(&e, 2, "bot.margin_threshold", "got nan");
    let e = err("[http]\nhandshake_timeout = \"1h\"\n");
    assert_invalid(
        &e,
        2,
        "http.handshake_timeout",
        "must be between 100ms and 5m, got \"1h\"",
    );
    let e = err("[storage]\nmap_size = 1048577\n");
    assert_invalid(&e, 2, "storage.map_size", "multiple of 4KiB");
    let e = err("[storage]\nmax_map_size = \"1MiB\"\n");
    assert_invalid(
        &e,
        2,
        "storage.max_map_size",
        "at least storage.map_size (1GiB)",
    );
    let e = err("[storage]\nmax_map_size = 1048577\n");
    assert_invalid(&e, 2, "storage.max_map_size", "multiple of 4KiB");
    let c = load_str(
        "ok.toml",
        "[storage]\nmap_size = \"4MiB\"\nmax_map_size = \"4MiB\"\n",
    )
    .unwrap();
    assert_eq!(
        (c.storage.map_size, c.storage.max_map_size),
        (4 * MIB, 4 * MIB)
    );
}

#[test]
fn bad_duration_strings() {
    for (value, needle) in [
        ("\"5sec\"", "unknown unit \"sec\""),
        ("\"1.5s\"", "fractions are not accepted"),
        ("\"\"", "expected a whole number and a unit"),
        ("\"5\"", "missing unit"),
        ("\"5 s\"", "unknown unit \" s\""),
        ("\"-5s\"", "expected a whole number and a unit"),
        ("\"99999999999h\"", "too large"),
        ("250", "bare numbers are not accepted"),
        ("true", "expected a duration string"),
    ] {
        let e = err(&format!("[websocket]\nwrite_timeout = {value}\n"));
        assert_invalid(&e, 2, "websocket.write_timeout", needle);
    }
}

#[test]
fn bad_size_strings() {
    for (value, needle) in [
        (
            "\"16KB\"",
            "unknown unit \"KB\"; use B, KiB, MiB, GiB or TiB",
        ),
        ("\"4 KiB\"", "unknown unit \" KiB\""),
        ("\"16384\"", "missing unit; write 16384 without quotes"),
        ("\"1.5MiB\"", "fractions are not accepted"),
        ("\"KiB\"", "expected a whole number and a unit"),
        ("\"99999999999TiB\"", "too large"),
        ("1.5", "expected a size"),
    ] {
        let e = err(&format!("[websocket]\nread_buffer_bytes = {value}\n"));
        assert_invalid(&e, 2, "websocket.read_buffer_bytes", needle);
    }
}

#[test]
fn duration_and_size_parsing_and_formatting() {
    assert_eq!(parse_duration("250ms"), Ok(ms(250)));
    assert_eq!(parse_duration("500us"), Ok(Duration::from_micros(500)));
    assert_eq!(parse_duration("2m"), Ok(secs(120)));
    assert_eq!(parse_duration("1h"), Ok(secs(3600)));
    assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    assert_eq!(format_duration(secs(120)), "2m");
    assert_eq!(format_duration(secs(90)), "90s");
    assert_eq!(format_duration(ms(1500)), "1500ms");
    assert_eq!(format_duration(Duration::from_micros(200)), "200us");
    assert_eq!(parse_size("16KiB"), Ok(16384));
    assert_eq!(parse_size("1GiB"), Ok(GIB));
    assert_eq!(parse_size("10B"), Ok(10));
    assert_eq!(format_size(16384), "16KiB");
    assert_eq!(format_size(1000), "1000");
    assert_eq!(format_size(0), "0");
    for d in ["1us", "999us", "1ms", "61s", "59m", "25h", "3600ms"] {
        let parsed = parse_duration(d).unwrap();
        assert_eq!(parse_duration(&format_duration(parsed)), Ok(parsed));
    }
}

#[test]
fn cross_field_rule_blames_the_key_the_overlay_set() {
    // The overlay lowers idle_timeout below the default ping_interval (30s).
    let e = err("[websocket]\nidle_timeout = \"20s\"\n");
    assert_eq!(
        e.to_string(),
        "tuning/bad.toml:2: key 'websocket.idle_timeout': must be greater than websocket.ping_interval (30s), got 20s"
    );
    // The overlay raises ping_interval above the default idle_timeout (75s).
    let e = err("[websocket]\n\nping_interval = \"90s\"\n");
    assert_eq!(
        e.to_string(),
        "tuning/bad.toml:3: key 'websocket.ping_interval': must be less than websocket.idle_timeout (75s), got 90s"
    );
    // Both set and consistent: fine.
    load_str(
        "ok.toml",
        "[websocket]\nping_interval = \"90s\"\nidle_timeout = \"4m\"\n",
    )
    .unwrap();
    let e = err("[conversations]\ntyping_expiry = \"1s\"\n");
    assert_invalid(
        &e,
        2,
        "conversations.typing_expiry",
        "greater than conversations.typing_interval (1s)",
    );
    let e = err("[inference]\nbatch_window = \"500ms\"\n");
    assert_invalid(
        &e,
        2,
        "inference.batch_window",
        "less than inference.max_wait (200ms)",
    );
    let e = err("[conversations]\nmax_text_bytes = \"128KiB\"\n");
    assert_invalid(
        &e,
        2,
        "conversations.max_text_bytes",
        "must be at most websocket.max_message_bytes (65536), got 131072",
    );
}

#[test]
fn syntax_errors_give_the_line() {
    let e = err("[server]\nbacklog = 10\nlisten = \n");
    assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
    assert_eq!(e.line(), Some(3), "{e}");
    assert!(
        e.to_string()
            .starts_with("tuning/bad.toml:3: invalid TOML: "),
        "{e}"
    );
    assert!(!e.to_string().contains('\n'));
    let e = err("[server]\nbacklog = 1\nbacklog = 2\n");
    assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
    assert_eq!(e.line(), Some(3), "{e}");
}

#[test]
fn plugin_handlers_are_accepted_once_allowed_and_auto_assign_parses() {
    // Process-wide and set once; no other test allows plugins.
    allow_plugin_handlers(["lookup_sample"]);
    let c = load_str(
        "t.toml",
        "[bot]\nhandlers = [\"lookup_sample\", \"fallback\"]\n",
    )
    .unwrap();
    assert_eq!(
        c.bot.handlers,
        [BotHandler::Plugin("lookup_sample"), BotHandler::Fallback]
    );
    assert!(c
        .to_toml()
        .contains("handlers = [\"lookup_sample\", \"fallback\"]"));
    let e = err("[bot]\nhandlers = [\"lookup_sampel\"]\n");
    assert_invalid(
        &e,
        2,
        "bot.handlers",
        "\"lookup_sample\", got \"lookup_sampel\"",
    );

    assert!(Config::default().agents.auto_assign);
    let c = load_str("t.toml", "[agents]\nauto_assign = false\n").unwrap();
    assert!(!c.agents.auto_assign);
    let e = err("[agents]\nauto_assign = \"no\"\n");
    assert_invalid(&e, 2, "agents.auto_assign", "");
}

#[test]
fn choices_log_level_and_listen_are_validated() {
    let e = err("[storage]\ndurability = \"fsink\"\n");
    assert_invalid(
        &e,
        2,
        "storage.durability",
        "must be one of \"fsync\", \"batch\", \"none\", got \"fsink\"",
    );
    let e = err("[log]\nlevel = \"verbose\"\n");
    assert_invalid(&e, 2, "log.level", "invalid log directive \"verbose\"");
    let e = err("[log]\nlevel = \"info,my crate=debug\"\n");
    assert_invalid(
        &e,
        2,
        "log.level",
        "invalid log directive \"my crate=debug\"",
    );
    let c = load_str(
        "ok.toml",
        "[log]\nlevel = \"warn,switchboard::storage=debug\"\nformat = \"json\"\n",
    )
    .unwrap();
    assert_eq!(c.log.level, "warn,switchboard::storage=debug");
    assert_eq!(c.log.format.resolve(true), LogFormat::Json);
    assert_eq!(LogFormat::Auto.resolve(true), LogFormat::Text);
    assert_eq!(LogFormat::Auto.resolve(false), LogFormat::Json);
    let e = err("[server]\nlisten = \"localhost:8080\"\n");
    assert_invalid(&e, 2, "server.listen", "host names are not resolved");
    let c = load_str("ok.toml", "[server]\nlisten = \"[::1]:0\"\n").unwrap();
    assert_eq!(
        c.server.listen,
        "[::1]:0".parse::<std::net::SocketAddr>().unwrap()
    );
    let e = err("[bot]\nhandlers = [\"intent\", \"fallback\", \"intent\"]\n");
    assert_invalid(
        &e,
        2,
        "bot.handlers",
        "element 3: handler \"intent\" is listed twice",
    );
    let e = err("[bot]\nhandlers = [\"intent\", \"smalltalk\"]\n");
    assert_invalid(&e, 2, "bot.handlers", "element 2: must be one of");
    let e = err("[bot]\nhandlers = []\n");
    assert_invalid(&e, 2, "bot.handlers", "at least one handler");
    let c = load_str("t.toml", "[bot]\nhandlers = [\"risk_control\", \"echo\"]\n").unwrap();
    assert_eq!(c.bot.handlers, [BotHandler::RiskControl, BotHandler::Echo]);
    let e = err("[storage]\ndir = \"\"\n");
    assert_invalid(
        &e,
        2,
        "storage.dir",
        "must be 1 to 4096 characters long, got 0",
    );
}

#[test]
fn cores_are_validated_and_resolved() {
    let e = err("[shards]\ncores = [0,\n  1,\n  0]\n");
    assert_invalid(&e, 4, "shards.cores", "element 3: core 0 is listed twice");
    let e = err("[shards]\ncores = []\n");
    assert_invalid(&e, 2, "shards.cores", "at least one core id");
    let e = err("[shards]\ncores = \"some\"\n");
    assert_invalid(
        &e,
        2,
        "shards.cores",
        "expected \"all\" or a list of core ids",
    );
    let e = err("[shards]\ncores = [-1]\n");
    assert_invalid(
        &e,
        2,
        "shards.cores",
        "element 1: must be between 0 and 4095, got -1",
    );

    assert_eq!(Cores::All.resolve(&[0, 1]), Ok(vec![0, 1]));
    assert_eq!(Cores::List(vec![1]).resolve(&[0, 1]), Ok(vec![1]));
    assert_eq!(
        Cores::List(vec![0, 2]).resolve(&[0, 1]),
        Err(CoresError::Unavailable {
            core: 2,
            available: vec![0, 1]
        })
    );
    assert_eq!(Cores::All.resolve(&[]), Err(CoresError::NoneAvailable));

    let c = load_str("mine.toml", "\n[shards]\ncores = [3]\n").unwrap();
    let e = c.shard_cores(&[0, 1]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "mine.toml:3: key 'shards.cores': core 3 is not available to this process (available: [0, 1])"
    );
    assert_eq!(c.shard_cores(&[2, 3]).unwrap(), vec![3]);
}

#[test]
fn auth_and_api_sections() {
    let c = Config::default();
    assert_eq!(c.auth.secret_file, None);
    assert_eq!(
        c.auth.secret_path(Path::new("/var/lib/sb")),
        PathBuf::from("/var/lib/sb/auth-secret")
    );
    assert!(!c.agents.dev_static_tokens);
    let c = load_str(
        "auth.toml",
        "[auth]\nsecret_file = \"/etc/sb/secret\"\ntoken_ttl = \"1h\"\nlockout_failures = 3\n\n[api]\nmax_body_bytes = \"4KiB\"\n\n[agents]\ndev_static_tokens = true\n",
    )
    .unwrap();
    assert_eq!(
        c.auth.secret_path(Path::new("x")),
        PathBuf::from("/etc/sb/secret")
    );
    assert_eq!(c.auth.token_ttl, Duration::from_secs(3600));
    assert_eq!(c.auth.lockout_failures, 3);
    assert_eq!(c.api.max_body_bytes, 4096);
    assert!(c.agents.dev_static_tokens);
    assert_eq!(load_str("again", &c.to_toml()).unwrap(), c);
    let e = err("[auth]\ntoken_ttl = \"10s\"\n");
    assert_invalid(&e, 2, "auth.token_ttl", "");
    let e = err("[auth]\nmin_password_length = 4\n");
    assert_invalid(&e, 2, "auth.min_password_length", "");
    let e = err("[api]\nmax_body_bytes = \"2MiB\"\n");
    assert_invalid(&e, 2, "api.max_body_bytes", "");
}

#[test]
fn visitor_sites_load_keys_validate_and_never_print_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("acme.key");
    std::fs::write(&key_file, "k".repeat(40) + "\n").unwrap();
    let c = load_str(
        "t.toml",
        &format!(
            "[visitors]\nallow_unlisted_sites = false\n\n[visitors.sites.acme]\norigins = [\"https://shop.example\"]\nidentity_key_file = {key_file:?}\n\n[visitors.sites.\"b.example\"]\n"
        ),
    )
    .unwrap();
    assert!(!c.visitors.allow_unlisted_sites);
    let acme = c.visitors.site("acme").unwrap();
    assert_eq!(
        acme.identity_key.as_deref(),
        Some("k".repeat(40).as_bytes())
    );
    assert_eq!(acme.origins, vec!["https://shop.example".to_string()]);
    assert!(c.visitors.site("b.example").unwrap().identity_key.is_none());
    assert!(!format!("{acme:?}").contains("kkkk"), "{acme:?}");
    assert_eq!(load_str("p", &c.to_toml()).unwrap(), c);
    // No default key, no short key, no unreadable file, no bad origin.
    assert!(Config::default().visitors.sites.is_empty());
    let e = err("[visitors.sites.acme]\nidentity_key = \"short\"\n");
    assert_invalid(
        &e,
        2,
        "visitors.sites.acme.identity_key",
        "at least 32 bytes",
    );
    let e = err("[visitors.sites.acme]\nidentity_key_file = \"/nonexistent/key\"\n");
    assert_invalid(
        &e,
        2,
        "visitors.sites.acme.identity_key_file",
        "cannot read",
    );
    let e = err("[visitors.sites.acme]\norigins = [\"shop.example/path\"]\n");
    assert_invalid(&e, 2, "visitors.sites.acme.origins", "scheme://host");
    let e = err("[visitors.sites.acme]\ncolour = 1\n");
    assert_invalid(&e, 2, "visitors.sites.acme.colour", "valid keys are");
}

#[test]
fn agent_accounts_merge_default_and_validate() {
    let c = load_str(
        "agents.toml",
        "[agents]\ndefault_max_open = 7\n\n[agents.accounts.alice]\ntoken = \"alice-0123456789abcdef\"\nname = \"Alice\"\nmax_open = 2\n\n[agents.accounts.bob]\ntoken = \"bob-0123456789abcdef\"\n",
    )
    .unwrap();
    let alice = &c.agents.accounts["alice"];
    assert_eq!((alice.name.as_str(), alice.max_open), ("Alice", 2));
    let bob = &c.agents.accounts["bob"];
    assert_eq!((bob.name.as_str(), bob.max_open), ("bob", 7));
    assert!(!format!("{bob:?}").contains("0123456789"));

    let e = err("[agents.accounts.carol]\nname = \"Carol\"\n");
    assert_invalid(&e, 1, "agents.accounts.carol.token", "required");
    let e = err("[agents.accounts.dan]\ntoken = \"short\"\n");
    assert_invalid(&e, 2, "agents.accounts.dan.token", "16 to 256 characters");
    let e = err("[agents.accounts.\"bad id\"]\ntoken = \"0123456789abcdef\"\n");
    assert_invalid(&e, 1, "agents.accounts.bad id", "invalid agent id");
    let e = err(
        "[agents.accounts.a]\ntoken = \"0123456789abcdef\"\n[agents.accounts.b]\ntoken = \"0123456789abcdef\"\n",
    );
    assert_invalid(
        &e,
        4,
        "agents.accounts.b.token",
        "same token as agents.accounts.a",
    );
    let e = err("[agents.accounts.a]\ntoken = \"0123456789abcdef\"\nmax_open = 0\n");
    assert_invalid(
        &e,
        3,
        "agents.accounts.a.max_open",
        "between 1 and 1000, got 0",
    );
}

#[test]
fn to_toml_round_trips() {
    let overlay = r#"
[server]
listen = "[::1]:9000"
[shards]
cores = [1, 0]
max_sessions_per_shard = 9000
[websocket]
read_buffer_bytes = 1500
[storage]
commit_window = "250us"
commit_interval = "0s"
apply_interval = "0s"
durability = "batch"
map_size = "2GiB"
[agents.accounts.alice]
token = "tok\"en-with-quote-0123"
name = "Alice \"Al\" Ünicode\\"
[bot]
confidence_threshold = 0.1
margin_threshold = 1
handlers = ["intent", "fallback"]
[risk_control]
blocked_words = ["spam", "naïve \"quoted\""]
blocked_patterns = ['\d{16}']
"#;
    let config = load_str("over.toml", overlay).unwrap();
    let printed = config.to_toml();
    let reloaded = load_str("printed.toml", &printed).unwrap_or_else(|e| panic!("{e}\n{printed}"));
    assert_eq!(reloaded, config);
    assert_eq!(reloaded.to_toml(), printed);
    assert_eq!(
        config.risk_control.blocked_patterns,
        vec![r"\d{16}".to_owned()]
    );
    assert_eq!(config.bot.margin_threshold, 1.0);
    // The defaults round-trip too, and printing lists every key.
    let defaults = Config::default();
    assert_eq!(load_str("p", &defaults.to_toml()).unwrap(), defaults);
    let printed_keys = flatten(&defaults.to_toml()).len();
    let leaf_keys = known_keys()
        .iter()
        .filter(|k| k.contains('.') && *k != "agents.accounts" && *k != "visitors.sites")
        .count();
    assert_eq!(printed_keys, leaf_keys);
}

#[test]
fn load_reads_files_and_names_them() {
    let dir = std::env::temp_dir().join(format!("switchboard-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(&good, "[diagnostics]\necho = true\n").unwrap();
    assert!(load(Some(&good)).unwrap().diagnostics.echo);
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[diagnostics]\necho = \"yes\"\n").unwrap();
    let e = load(Some(&bad)).unwrap_err();
    assert_eq!(e.file(), bad.display().to_string());
    assert_eq!(e.line(), Some(2));
    let missing = dir.join("missing.toml");
    let e = load(Some(&missing)).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }));
    assert!(
        e.to_string()
            .starts_with(&format!("{}: cannot read: ", missing.display())),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn error_at_points_where_the_value_came_from() {
    let c = load_str("site.toml", "# x\n[inference]\nmodel = \"/opt/m.onnx\"\n").unwrap();
    let e = c.error_at("inference.model", "file not found");
    assert_eq!(
        e.to_string(),
        "site.toml:3: key 'inference.model': file not found"
    );
    let e = c.error_at("inference.tokenizer", "file not found");
    assert_eq!(e.file(), "<embedded default>");
    let line = EMBEDDED_DEFAULT
        .lines()
        .position(|l| l.starts_with("tokenizer ="))
        .unwrap()
        + 1;
    assert_eq!(e.line(), Some(line));
}

#[test]
fn bot_variants_load_print_back_and_default_to_one_variant() {
    let none = load_str("t.toml", "").unwrap();
    assert!(none.bot.variants.is_empty());
    let implicit = none.bot.effective_variants();
    assert_eq!(implicit.len(), 1);
    assert_eq!(implicit[0].name, DEFAULT_VARIANT);
    assert_eq!(
        implicit[0].answer_handlers,
        [
            BotHandler::HumanTransfer,
            BotHandler::Intent,
            BotHandler::Fallback
        ]
    );
    let text = "[bot]\nconfidence_threshold = 0.4\n\
                [[bot.variants]]\nname = \"control\"\nweight = 90\n\
                [[bot.variants]]\nname = \"strict\"\nweight = 10\nconfidence_threshold = 0.7\n\
                margin_threshold = 0.1\nhandlers = [\"intent\", \"fallback\"]\n";
    let c = load_str("t.toml", text).unwrap();
    assert_eq!(c.bot.variants.len(), 2);
    assert_eq!(load_str("t.toml", &c.to_toml()).unwrap(), c);
    let variants = c.bot.effective_variants();
    assert_eq!(variants[0].bot.confidence_threshold, 0.4);
    assert_eq!(variants[0].answer_handlers.len(), 3);
    assert_eq!(variants[1].bot.confidence_threshold, 0.7);
    assert_eq!(variants[1].bot.margin_threshold, 0.1);
    assert_eq!(
        variants[1].answer_handlers,
        [BotHandler::Intent, BotHandler::Fallback]
    );
    // Inline tables are the same list.
    let inline = "[bot]\nvariants = [{ name = \"a\", weight = 1 }, { name = \"b\", weight = 2 }]\n";
    let c = load_str("t.toml", inline).unwrap();
    assert_eq!(c.bot.variants[1].name, "b");
    assert_eq!(c.bot.variants[1].weight, 2.0);
}

#[test]
fn a_variants_model_chooses_among_the_encoders_the_node_loads() {
    let companion = "[inference]\ncompanion_model = \"c.onnx\"\ncompanion_tokenizer = \"c.json\"\n";
    let text = format!(
        "{companion}[[bot.variants]]\nname = \"node\"\nweight = 1\n\
         [[bot.variants]]\nname = \"english\"\nweight = 1\nmodel = \"primary\"\n\
         [[bot.variants]]\nname = \"multilingual\"\nweight = 1\nmodel = \"companion\"\n"
    );
    let c = load_str("t.toml", &text).unwrap();
    let models: Vec<_> = c.bot.variants.iter().map(|v| v.model).collect();
    assert_eq!(
        models,
        [
            None,
            Some(VariantModel::Primary),
            Some(VariantModel::Companion)
        ]
    );
    let effective: Vec<_> = c.bot.effective_variants().iter().map(|v| v.model).collect();
    assert_eq!(effective, models);
    assert_eq!(load_str("t.toml", &c.to_toml()).unwrap(), c);
    // "primary" needs no companion.
    let primary = "[[bot.variants]]\nname = \"a\"\nweight = 1\nmodel = \"primary\"\n";
    assert_eq!(
        load_str("t.toml", primary).unwrap().bot.variants[0].model,
        Some(VariantModel::Primary)
    );
    // The companion configured in another layer counts; the error points at the variant's line.
    let asks = "[bot]\nconfidence_threshold = 0.5\n\
                [[bot.variants]]\nname = \"a\"\nweight = 1\nmodel = \"companion\"\n";
    let e = err(asks);
    assert_invalid(
        &e,
        6,
        "bot.variants[1].model",
        "variant \"a\" asks for the companion",
    );
    let disabled = format!("{companion}enabled = false\n{asks}");
    assert!(err(&disabled).to_string().contains("this node loads none"));
}

#[test]
fn bad_bot_variants_are_refused_with_their_line() {
    let head = "[[bot.variants]]\nname = \"a\"\nweight = 1\n";
    // (text after `head`, or the whole file when it starts with "!"; line, key, message)
    let cases: &[(&str, usize, &str, &str)] = &[
        (
            "[[bot.variants]]\nname = \"a\"\nweight = 1\n",
            5,
            "bot.variants[2].name",
            "listed twice",
        ),
        (
            "!\n[[bot.variants]]\nname = \"a b\"\nweight = 1\n",
            2,
            "bot.variants[1].name",
            "invalid variant name",
        ),
        (
            "!\n[[bot.variants]]\nweight = 1\n",
            1,
            "bot.variants[1]",
            "needs a name",
        ),
        (
            "!\n[[bot.variants]]\nname = \"a\"\n",
            1,
            "bot.variants[1]",
            "needs a weight",
        ),
        (
            "!\n[[bot.variants]]\nname = \"a\"\nweight = -1\n",
            3,
            "bot.variants[1].weight",
            "must be between",
        ),
        (
            "handlers = [\"risk_control\", \"intent\"]\n",
            4,
            "bot.variants[1].handlers",
            "cannot be a variant's handler",
        ),
        (
            "handlers = [\"intent\", \"intent\"]\n",
            4,
            "bot.variants[1].handlers",
            "listed twice",
        ),
        (
            "handlers = [\"nope\"]\n",
            4,
            "bot.variants[1].handlers",
            "must be one of",
        ),
        (
            "model = \"models/cache/other.onnx\"\n",
            4,
            "bot.variants[1].model",
            "a variant's model must be one of \"primary\" ([inference] model alone) or \
             \"companion\"",
        ),
        (
            "model = \"companion\"\n",
            4,
            "bot.variants[1].model",
            "asks for the companion model, but this node loads none: set [inference] \
             companion_model",
        ),
        ("model = 3\n", 4, "bot.variants[1].model", ""),
        (
            "colour = \"blue\"\n",
            4,
            "bot.variants[1].colour",
            "unknown key in a variant",
        ),
    ];
    for (text, line, key, message) in cases {
        let text = match text.strip_prefix("!\n") {
            Some(whole) => whole.to_owned(),
            None => format!("{head}{text}"),
        };
        assert_invalid(&err(&text), *line, key, message);
    }
    let zero =
        "[[bot.variants]]\nname = \"a\"\nweight = 0\n[[bot.variants]]\nname = \"b\"\nweight = 0\n";
    assert!(err(zero)
        .to_string()
        .contains("at least one variant needs a weight above 0"));
    let many: String = (0..=MAX_VARIANTS)
        .map(|n| format!("[[bot.variants]]\nname = \"v{n}\"\nweight = 1\n"))
        .collect();
    assert!(err(&many).to_string().contains("at most 16 variants"));
    assert!(err("[bot]\nvariants = 3\n")
        .to_string()
        .contains("key 'bot.variants'"));
}
