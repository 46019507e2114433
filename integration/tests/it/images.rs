//! The workspace images' files: `Dockerfile.base` makes wsagent PID 1 with the right stop
//! signal and health check, and the config each image ships is one wsagent accepts.
//!
//! The images cannot be built here (nothing can be pulled), so these check the files
//! themselves; the config is loaded by the daemon's own config loader.

use std::path::Path;

fn read(rel: &str) -> String {
    let p = crate::repo_root().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

/// The Dockerfile's instructions, continuation lines joined.
fn instructions(dockerfile: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in dockerfile.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                cur.push_str(part);
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                out.push(std::mem::take(&mut cur));
            }
        }
    }
    out
}

#[test]
fn the_base_image_runs_wsagent_as_pid_1_with_sigterm_and_a_ready_healthcheck() {
    let ins = instructions(&read("Dockerfile.base"));
    let has = |want: &str| {
        assert!(
            ins.iter().any(|i| i == want),
            "Dockerfile.base has no `{want}`; it has:\n{}",
            ins.join("\n")
        )
    };
    has(r#"ENTRYPOINT ["/usr/local/bin/wsagent", "run"]"#);
    has("STOPSIGNAL SIGTERM");
    assert!(
        ins.iter().any(|i| i.starts_with("HEALTHCHECK")
            && i.ends_with(r#"CMD ["/usr/local/bin/wsagent", "status", "--ready"]"#)),
        "Dockerfile.base has no `HEALTHCHECK ... CMD wsagent status --ready`"
    );
    // A shell-form ENTRYPOINT or CMD would make /bin/sh PID 1 instead of wsagent.
    assert!(
        !ins.iter().any(|i| i.starts_with("CMD ")),
        "no CMD: {ins:?}"
    );
}

#[test]
fn each_image_config_is_accepted_by_wsagent() {
    for rel in ["images/base/config.toml", "images/code-server/config.toml"] {
        let p = crate::repo_root().join(rel);
        let loaded = agent::config::load(&agent::config::Sources {
            system_file: None,
            explicit: Some(p.clone()),
            env: vec![],
        })
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        // The user's `wsagent save` (Coder's shutdown_script) and `wsagent status` run in
        // the Coder agent's environment, as the user: they must find the daemon's socket.
        let socket = loaded
            .config
            .daemon
            .socket
            .clone()
            .unwrap_or_else(|| panic!("{rel}: daemon.socket should be stated"));
        let agent = &loaded.config.services["coder-agent"];
        assert_eq!(
            agent.env.get("WSAGENT_SOCKET"),
            Some(&socket),
            "{rel}: the coder-agent service should get WSAGENT_SOCKET = daemon.socket"
        );
        assert!(
            loaded.config.daemon.state_dir.starts_with("/home/coder/"),
            "{rel}: the state dir (save journal) belongs on the home volume"
        );
        if rel.contains("code-server") {
            for svc in ["dockerd", "code-server", "coder-agent"] {
                let s = loaded
                    .config
                    .services
                    .get(svc)
                    .unwrap_or_else(|| panic!("{rel}: no service {svc}"));
                if svc != "coder-agent" {
                    assert!(s.health.is_some(), "{rel}: {svc} has no health check");
                }
            }
            let brew = loaded.config.once.iter().find(|o| o.name == "linuxbrew");
            let brew = brew.unwrap_or_else(|| panic!("{rel}: linuxbrew is not a one-time task"));
            assert!(
                brew.marker
                    .as_deref()
                    .is_some_and(|m| m.starts_with("/home/linuxbrew/"))
            );
        }
        assert_eq!(
            loaded.config.startup.user.as_deref(),
            Some("coder"),
            "{rel}: startup.user"
        );
    }
}

#[test]
fn the_fish_skeleton_is_shipped_where_wsagent_copies_defaults_from() {
    let skel = Path::new("images/code-server/skel/.config/fish/config.fish");
    assert!(crate::repo_root().join(skel).is_file());
    let dockerfile = read("images/code-server/Dockerfile");
    assert!(
        dockerfile.contains("/etc/wsagent/skel"),
        "images/code-server/Dockerfile does not install the skeleton into /etc/wsagent/skel"
    );
}
