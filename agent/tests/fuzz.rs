//! Property tests standing in for fuzzing (no cargo-fuzz or nightly here): wsagent's
//! three parsers of untrusted input never panic, whatever they are given.
//!
//! - config: `agent::config::load` on arbitrary text, on mutated valid configs, on
//!   structured configs with values of the wrong type and range, and with arbitrary
//!   `WSAGENT_*` overrides; when it refuses, every problem names its file and a place in
//!   it (a line or a key).
//! - the local API: every request and answer type of `agent_proto::local` decoded from
//!   arbitrary bytes and from arbitrary JSON values; what decodes re-encodes to itself.
//! - the control plane: every `agent_proto::coder` type, the same way.
//!
//! `scripts/fuzz` runs this file with a bounded `PROPTEST_CASES`; a crash found becomes
//! a plain `#[test]` at the bottom ("regressions").

use agent::config::{Sources, load};
use proptest::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;

// --- config ------------------------------------------------------------------------

/// Load `text` as the explicit config file (no system file), with `env` overrides; when
/// refused, check every problem names the file and a place.
fn check_config(text: &str, env: Vec<(String, String)>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    let sources = Sources {
        system_file: None,
        explicit: Some(path.clone()),
        env,
    };
    if let Err(e) = load(&sources) {
        assert!(!e.problems.is_empty(), "an error without problems");
        for p in &e.problems {
            assert!(!p.file.is_empty(), "problem without a file: {p:?}");
            assert!(
                p.line.is_some() || p.key.is_some(),
                "problem without a place (line or key): {p:?}\n--- config ---\n{text}"
            );
            assert!(!p.message.is_empty(), "problem without a message: {p:?}");
        }
        // The rendering must not panic either.
        let _ = e.to_string();
    }
}

/// Valid configs to mutate: the embedded defaults and a few written like the docs'.
fn corpus() -> Vec<&'static str> {
    vec![
        agent::config::DEFAULTS,
        "[services.web]\ncommand = [\"python3\", \"-m\", \"http.server\"]\nrestart = \"on-failure\"\n[services.web.health]\nkind = \"http\"\nurl = \"http://127.0.0.1:8000/\"\ninterval = \"2s\"\n",
        "[shutdown]\nbudget = \"10s\"\npre_stop = [\"echo bye\"]\n[save]\nmode = \"branch\"\nroots = [\"~/src\"]\n",
        "[services.a]\nshell = \"sleep 1\"\ndepends_on = [\"b\"]\n[services.b]\ncommand = [\"true\"]\n[services.b.backoff]\ninitial = \"10ms\"\nmax = \"1s\"\nmax_failures = 3\n",
        "[git_providers.gitlab]\nhost = \"gitlab.example.com\"\nrefresh_interval = \"5m\"\n[control_plane]\nrequest_timeout = \"1s\"\nlog_queue_lines = 10\n",
    ]
}

/// Bits of TOML that make interesting edits.
const SNIPPETS: &[&str] = &[
    "=",
    "\"",
    "'",
    "[",
    "]",
    "[[",
    "]]",
    "{",
    "}",
    ",",
    "\n",
    "#",
    ".",
    "\\",
    "\"\"\"",
    "-",
    "0",
    "-1",
    "1e999",
    "nan",
    "inf",
    "true",
    "\"\"",
    "\"0s\"",
    "\"-1s\"",
    "\"99999999999999h\"",
    "[services]",
    "[services.x]",
    "[services.x.health]",
    "[[services]]",
    "command = []",
    "shell = \"\"",
    "kind = \"tcp\"",
    "depends_on = [\"x\"]",
    "restart = 5",
    "budget = 0",
    "\u{0}",
    "\u{feff}",
    "é",
    "\r\n",
    "   ",
    "\t",
];

#[derive(Debug, Clone)]
enum Edit {
    Delete(usize, usize),
    Insert(usize, usize),
    DuplicateLine(usize),
    SwapLines(usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 0usize..40).prop_map(|(a, n)| Edit::Delete(a, n)),
        (any::<usize>(), 0..SNIPPETS.len()).prop_map(|(a, i)| Edit::Insert(a, i)),
        any::<usize>().prop_map(Edit::DuplicateLine),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::SwapLines(a, b)),
    ]
}

/// The nearest char boundary at or below `at % (len + 1)`.
fn boundary(s: &str, at: usize) -> usize {
    let mut i = at % (s.len() + 1);
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut s = text.to_string();
    for e in edits {
        match *e {
            Edit::Delete(a, n) => {
                let from = boundary(&s, a);
                let to = boundary(&s, from + n).max(from);
                s.replace_range(from..to, "");
            }
            Edit::Insert(a, i) => {
                let at = boundary(&s, a);
                s.insert_str(at, SNIPPETS[i]);
            }
            Edit::DuplicateLine(a) => {
                let lines: Vec<&str> = s.lines().collect();
                if !lines.is_empty() {
                    let l = lines[a % lines.len()].to_string();
                    s = format!("{s}\n{l}\n");
                }
            }
            Edit::SwapLines(a, b) => {
                let mut lines: Vec<String> = s.lines().map(str::to_string).collect();
                if !lines.is_empty() {
                    let n = lines.len();
                    lines.swap(a % n, b % n);
                    s = lines.join("\n");
                }
            }
        }
    }
    s
}

/// A TOML value of any kind, the kinds a config key might wrongly get.
fn toml_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        prop_oneof![
            Just("0s"),
            Just("-1s"),
            Just("1ms"),
            Just("18446744073709551615s"),
            Just("99999999999999999999h"),
            Just("1.5s"),
            Just(""),
            Just("always"),
            Just("never"),
            Just("on-failure"),
            Just("snapshot"),
            Just("branch"),
            Just("http"),
            Just("unix-http"),
            Just("exec"),
            Just("tcp"),
            Just("SIGTERM"),
            Just("SIGNOPE"),
            Just("~"),
            Just("/"),
            Just("refs/heads/{workspace}/{branch}"),
            Just("{nope}"),
            Just("http://[::1"),
            Just("127.0.0.1:99999"),
            Just("info"),
            Just("loud"),
        ]
        .prop_map(|s| format!("{s:?}")),
        "[ -~]{0,12}".prop_map(|s| format!("{s:?}")),
        any::<f64>().prop_map(|f| format!("{f:?}").replace("NaN", "nan")),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            prop::collection::vec(("[a-z_]{1,8}", inner), 0..3).prop_map(|kv| {
                let body: Vec<String> = kv.iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!("{{ {} }}", body.join(", "))
            }),
        ]
    })
}

/// Known key paths of the config, as (table, key).
const KEYS: &[(&str, &str)] = &[
    ("daemon", "state_dir"),
    ("daemon", "log_level"),
    ("daemon", "socket"),
    ("shutdown", "budget"),
    ("shutdown", "pre_stop"),
    ("logs", "max_bytes"),
    ("logs", "keep"),
    ("save", "mode"),
    ("save", "roots"),
    ("save", "depth"),
    ("save", "repos"),
    ("save", "ref_template"),
    ("save", "max_file_size"),
    ("save", "parallelism"),
    ("control_plane", "url"),
    ("control_plane", "request_timeout"),
    ("control_plane", "fresh_token_timeout"),
    ("control_plane", "log_batch_interval"),
    ("control_plane", "log_queue_lines"),
    ("control_plane", "send_logs"),
    ("control_plane", "log_budget"),
    ("git_providers.github", "host"),
    ("git_providers.github", "refresh_interval"),
    ("git_providers.x", "host"),
    ("services.s", "command"),
    ("services.s", "shell"),
    ("services.s", "restart"),
    ("services.s", "depends_on"),
    ("services.s", "stop_signal"),
    ("services.s", "stop_timeout"),
    ("services.s", "start_timeout"),
    ("services.s", "user"),
    ("services.s", "env"),
    ("services.s", "cwd"),
    ("services.s", "enabled"),
    ("services.s.backoff", "initial"),
    ("services.s.backoff", "max"),
    ("services.s.backoff", "max_failures"),
    ("services.s.backoff", "window"),
    ("services.s.health", "kind"),
    ("services.s.health", "url"),
    ("services.s.health", "socket"),
    ("services.s.health", "address"),
    ("services.s.health", "command"),
    ("services.s.health", "interval"),
    ("services.s.health", "timeout"),
    ("services.t", "depends_on"),
    ("services.t", "command"),
];

/// A config of a few known keys, each given an arbitrary value.
fn structured_config() -> impl Strategy<Value = String> {
    prop::collection::vec((0..KEYS.len(), toml_value()), 1..8).prop_map(|kvs| {
        let mut tables: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
        for (i, v) in kvs {
            let (t, k) = KEYS[i];
            tables.entry(t).or_default().push(format!("{k} = {v}"));
        }
        let mut s = String::new();
        for (t, lines) in tables {
            s.push_str(&format!("[{t}]\n"));
            for l in lines {
                s.push_str(&l);
                s.push('\n');
            }
        }
        s
    })
}

fn env_override() -> impl Strategy<Value = (String, String)> {
    (
        prop::sample::select(agent::config::ENV_OVERRIDES.to_vec()),
        prop_oneof![
            "\\PC{0,20}",
            Just("-1s".to_string()),
            Just(String::new()),
            Just("branch".to_string()),
            Just("a:b::c".to_string()),
        ],
    )
        .prop_map(|((var, _), v)| (var.to_string(), v))
}

proptest! {
    #[test]
    fn config_load_never_panics_on_arbitrary_text(text in "\\PC{0,300}") {
        check_config(&text, Vec::new());
    }

    #[test]
    fn config_load_never_panics_on_mutated_valid_configs(
        base in prop::sample::select(corpus()),
        edits in prop::collection::vec(edit(), 1..6),
    ) {
        check_config(&apply(base, &edits), Vec::new());
    }

    #[test]
    fn config_load_never_panics_on_wrongly_typed_values(text in structured_config()) {
        check_config(&text, Vec::new());
    }

    #[test]
    fn config_load_never_panics_on_arbitrary_env_overrides(
        base in prop::sample::select(corpus()),
        env in prop::collection::vec(env_override(), 1..4),
    ) {
        check_config(base, env);
    }
}

// --- wire types --------------------------------------------------------------------------

/// An arbitrary JSON value (objects keyed by a few likely field names too).
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let key = prop_oneof![
        Just("type".to_string()),
        Just("kind".to_string()),
        Just("wait".to_string()),
        Just("repo".to_string()),
        Just("dry_run".to_string()),
        Just("event".to_string()),
        Just("outcomes".to_string()),
        Just("level".to_string()),
        Just("message".to_string()),
        Just("at".to_string()),
        Just("state".to_string()),
        Just("services".to_string()),
        Just("access_token".to_string()),
        Just("url".to_string()),
        Just("type".to_string()),
        Just("validations".to_string()),
        Just("logs".to_string()),
        Just("id".to_string()),
        "[a-z_]{1,10}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "\\PC{0,16}".prop_map(Value::String),
        prop_oneof![
            Just("progress"),
            Just("done"),
            Just("lifecycle"),
            Just("step"),
            Just("service"),
            Just("save"),
            Just("note"),
            Just("ready"),
            Just("info"),
            Just("running"),
            Just("00000000-0000-0000-0000-000000000000"),
            Just("2026-01-01T00:00:00Z"),
        ]
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Decode `T` from the bytes and from the value; whatever decodes must encode and decode
/// back to the same thing.
fn decodes<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(
    bytes: &[u8],
    value: &serde_json::Value,
) {
    let _ = serde_json::from_slice::<T>(bytes);
    if let Ok(t) = serde_json::from_value::<T>(value.clone()) {
        // serde_json (without `float_roundtrip`) may move a float by one ulp through
        // text; opaque floats (e.g. `token_extra`) are passed along, never compared.
        if has_float(value) {
            return;
        }
        let again = serde_json::to_vec(&t).expect("encode");
        let back: T = serde_json::from_slice(&again)
            .unwrap_or_else(|e| panic!("{t:?} does not decode back from its encoding: {e}"));
        assert_eq!(back, t, "round trip changed the value");
    }
}

fn has_float(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Number(n) => n.is_f64(),
        serde_json::Value::Array(a) => a.iter().any(has_float),
        serde_json::Value::Object(o) => o.values().any(has_float),
        _ => false,
    }
}

/// Every type of the local API (requests the daemon decodes, answers the CLI decodes).
fn local_types(bytes: &[u8], v: &serde_json::Value) {
    use agent_proto::local::*;
    decodes::<ShutdownRequest>(bytes, v);
    decodes::<SaveRequest>(bytes, v);
    decodes::<SaveLine>(bytes, v);
    decodes::<Event>(bytes, v);
    decodes::<Status>(bytes, v);
    decodes::<ServiceStatus>(bytes, v);
    decodes::<ActionReply>(bytes, v);
    decodes::<ApiError>(bytes, v);
    decodes::<agent_proto::save::RepoOutcome>(bytes, v);
}

/// Every type of the control plane (answers wsagent decodes, bodies the fake decodes).
fn coder_types(bytes: &[u8], v: &serde_json::Value) {
    use agent_proto::coder::*;
    decodes::<Response>(bytes, v);
    decodes::<ExternalAuthResponse>(bytes, v);
    decodes::<WorkspaceAgentLogSource>(bytes, v);
    decodes::<PostLogSourceRequest>(bytes, v);
    decodes::<PatchLogs>(bytes, v);
    decodes::<PatchAppStatus>(bytes, v);
}

proptest! {
    #[test]
    fn local_api_types_decode_arbitrary_input_without_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..200),
        v in json_value(),
    ) {
        local_types(&bytes, &v);
        local_types(v.to_string().as_bytes(), &v);
    }

    #[test]
    fn control_plane_types_decode_arbitrary_input_without_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..200),
        v in json_value(),
    ) {
        coder_types(&bytes, &v);
        coder_types(v.to_string().as_bytes(), &v);
    }
}

// --- regressions -----------------------------------------------------------------------
// Inputs a property once failed on are kept here as plain tests. None so far: 3000 and
// more cases per property found no panic and no placeless problem. (A first version of
// the round-trip check failed on a float in `token_extra` moving by one ulp through
// serde_json's text form; that was the check's mistake, not wsagent's.)

#[test]
fn an_empty_config_file_is_valid() {
    check_config("", Vec::new());
}
