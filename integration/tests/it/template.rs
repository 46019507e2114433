//! The Coder templates' wiring, checked by parsing `images/coder-template/main.tf` (the
//! Deployment template) and `images/coder-devcontainer-template/main.tf` (envbuilder execs
//! wsagent): the agent token and init script reach the container, the stop hooks and probes
//! call wsagent, Kubernetes' SIGKILL cannot arrive before wsagent's shutdown budget is spent,
//! and each `codertemplate.yaml` is what `scripts/gen-codertemplate` makes of its template.
//!
//! Terraform cannot run here (no provider downloads), so the `locals` the deadlines are
//! computed from are evaluated with hcl-rs, with `var.*` bound to the variables' defaults.

use std::collections::BTreeMap;

use hcl::eval::{Context, Evaluate};
use hcl::{Block, Body, Expression, Value};

/// The smallest margin between the grace period and wsagent's budget that we accept: the
/// preStop exec's start, the final report and log flush, the kubelet's slack.
const MIN_MARGIN_SECONDS: i64 = 5;

/// The template directories (under the repository root) and their names in Coder.
const DEPLOYMENT: &str = "images/coder-template";
const DEVCONTAINER: &str = "images/coder-devcontainer-template";
const TEMPLATES: [&str; 2] = [DEPLOYMENT, DEVCONTAINER];

/// What the probes run: exits 0 once wsagent's lifecycle is `ready`.
const READY_COMMAND: [&str; 3] = ["/usr/local/bin/wsagent", "status", "--ready"];

/// The labels Coder's own Kubernetes templates put on every object.
const CODER_LABELS: [&str; 8] = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/part-of",
    "com.coder.resource",
    "com.coder.workspace.id",
    "com.coder.workspace.name",
    "com.coder.user.id",
    "com.coder.user.username",
];

/// The Deployment template.
fn template() -> Body {
    template_at(DEPLOYMENT)
}

fn template_at(dir: &str) -> Body {
    let path = crate::repo_root().join(dir).join("main.tf");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    hcl::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Both templates, each with its directory for messages.
fn templates() -> Vec<(&'static str, Body)> {
    TEMPLATES.iter().map(|d| (*d, template_at(d))).collect()
}

fn blocks<'a>(body: &'a Body, ident: &str) -> impl Iterator<Item = &'a Block> + use<'a> {
    let ident = ident.to_string();
    body.blocks().filter(move |b| b.identifier() == ident)
}

/// The one block `ident "label0" "label1"...` of `body`.
#[track_caller]
fn block<'a>(body: &'a Body, ident: &str, labels: &[&str]) -> &'a Block {
    let found: Vec<&Block> = blocks(body, ident)
        .filter(|b| {
            b.labels().len() == labels.len()
                && b.labels().iter().zip(labels).all(|(l, w)| l.as_str() == *w)
        })
        .collect();
    assert_eq!(found.len(), 1, "expected one `{ident} {labels:?}` block");
    found[0]
}

/// Follow nested blocks: `path(body, &["spec", "template", "spec"])`.
#[track_caller]
fn path<'a>(body: &'a Body, idents: &[&str]) -> &'a Body {
    idents.iter().fold(body, |b, id| block(b, id, &[]).body())
}

#[track_caller]
fn attr<'a>(body: &'a Body, key: &str) -> &'a Expression {
    body.attributes()
        .find(|a| a.key() == key)
        .map(|a| a.expr())
        .unwrap_or_else(|| panic!("no attribute `{key}`"))
}

/// An expression as Terraform source, for "refers to" checks.
fn source(expr: &Expression) -> String {
    hcl::format::to_string(expr).expect("format expression")
}

/// `var.*` bound to the variables' defaults and `local.*` to every local that can be
/// evaluated from those (locals that read resources or data sources are left out).
fn context(tf: &Body) -> Context<'static> {
    let mut vars = BTreeMap::new();
    for v in blocks(tf, "variable") {
        if let Some(default) = v.body().attributes().find(|a| a.key() == "default") {
            let mut ctx = Context::new();
            ctx.declare_var("var", Value::Null);
            if let Ok(value) = default.expr().evaluate(&ctx) {
                vars.insert(v.labels()[0].as_str().to_string(), value);
            }
        }
    }
    let locals: Vec<(String, Expression)> = blocks(tf, "locals")
        .flat_map(|b| b.body().attributes())
        .map(|a| (a.key().to_string(), a.expr().clone()))
        .collect();
    let mut known: BTreeMap<String, Value> = BTreeMap::new();
    // Locals may refer to each other in any order: evaluate until nothing new comes.
    loop {
        let mut ctx = Context::new();
        ctx.declare_var("var", vars_value(&vars));
        ctx.declare_var("local", vars_value(&known));
        let before = known.len();
        for (k, e) in &locals {
            if !known.contains_key(k)
                && let Ok(v) = e.evaluate(&ctx)
            {
                known.insert(k.clone(), v);
            }
        }
        if known.len() == before {
            break;
        }
    }
    let mut ctx = Context::new();
    ctx.declare_var("var", vars_value(&vars));
    ctx.declare_var("local", vars_value(&known));
    ctx
}

fn vars_value(m: &BTreeMap<String, Value>) -> Value {
    Value::Object(m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

#[track_caller]
fn eval_i64(ctx: &Context<'_>, expr: &Expression) -> i64 {
    match expr.evaluate(ctx) {
        Ok(Value::Number(n)) => n
            .as_i64()
            .unwrap_or_else(|| panic!("not an integer: {}", source(expr))),
        other => panic!(
            "`{}` does not evaluate to a number: {other:?}",
            source(expr)
        ),
    }
}

/// The pod spec's workspace container.
fn container(tf: &Body) -> &Body {
    let deployment = block(tf, "resource", &["kubernetes_deployment", "main"]).body();
    let pod = path(deployment, &["spec", "template", "spec"]);
    let containers: Vec<_> = blocks(pod, "container").collect();
    assert_eq!(containers.len(), 1, "one workspace container");
    containers[0].body()
}

fn pod_spec(tf: &Body) -> &Body {
    let deployment = block(tf, "resource", &["kubernetes_deployment", "main"]).body();
    path(deployment, &["spec", "template", "spec"])
}

/// The container's environment as name -> value expression: its `env` blocks, and the
/// entries of the local map a `dynamic "env"` block iterates over.
fn container_env(tf: &Body) -> BTreeMap<String, Expression> {
    let c = container(tf);
    let mut env: BTreeMap<String, Expression> = blocks(c, "env")
        .map(|e| {
            let name = match attr(e.body(), "name") {
                Expression::String(s) => s.clone(),
                other => panic!("env name is not a literal: {other:?}"),
            };
            (name, attr(e.body(), "value").clone())
        })
        .collect();
    for d in blocks(c, "dynamic").filter(|b| b.labels().first().map(|l| l.as_str()) == Some("env"))
    {
        let over = source(attr(d.body(), "for_each"));
        let name = over
            .strip_prefix("nonsensitive(")
            .and_then(|o| o.strip_suffix(')'))
            .unwrap_or(&over)
            .strip_prefix("local.")
            .unwrap_or_else(|| panic!("dynamic env iterates over `{over}`, not a local map"));
        let content = path(d.body(), &["content"]);
        assert_eq!(source(attr(content, "name")), "env.key");
        assert_eq!(source(attr(content, "value")), "env.value");
        env.extend(object(local(tf, name)));
    }
    env
}

/// The expression of `local.<name>`.
#[track_caller]
fn local<'a>(tf: &'a Body, name: &str) -> &'a Expression {
    blocks(tf, "locals")
        .flat_map(|b| b.body().attributes())
        .find(|a| a.key() == name)
        .map(|a| a.expr())
        .unwrap_or_else(|| panic!("no local `{name}`"))
}

/// An object expression's entries, keys as strings.
#[track_caller]
fn object(expr: &Expression) -> BTreeMap<String, Expression> {
    let Expression::Object(o) = expr else {
        panic!("not an object: {}", source(expr));
    };
    o.iter()
        .map(|(k, v)| {
            let k = match k {
                hcl::ObjectKey::Identifier(i) => i.to_string(),
                hcl::ObjectKey::Expression(Expression::String(s)) => s.clone(),
                other => panic!("object key is not a literal: {other:?}"),
            };
            (k, v.clone())
        })
        .collect()
}

/// `local.X` resolved to X's object; an object literal as it is.
#[track_caller]
fn object_or_local(tf: &Body, expr: &Expression) -> BTreeMap<String, Expression> {
    match source(expr).strip_prefix("local.") {
        Some(name) => object(local(tf, name)),
        None => object(expr),
    }
}

/// The one `data "coder_parameter" "<name>"` block.
#[track_caller]
fn parameter<'a>(tf: &'a Body, name: &str) -> &'a Body {
    let p = block(tf, "data", &["coder_parameter", name]).body();
    assert_eq!(attr(p, "name"), &Expression::String(name.into()));
    p
}

/// An exec command (an array literal or a local holding one) evaluated to strings.
#[track_caller]
fn command(tf: &Body, expr: &Expression) -> Vec<String> {
    match expr.evaluate(&context(tf)) {
        Ok(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => s,
                other => panic!("command item is not a string: {other:?}"),
            })
            .collect(),
        other => panic!("`{}` is not a list of strings: {other:?}", source(expr)),
    }
}

#[track_caller]
fn refers(env: &BTreeMap<String, Expression>, name: &str, to: &str, dir: &str) {
    let e = env
        .get(name)
        .unwrap_or_else(|| panic!("{dir}: the container has no env {name}"));
    assert!(
        source(e).contains(to),
        "{dir}: env {name} = `{}` should refer to {to}",
        source(e)
    );
}

#[test]
fn the_container_gets_the_agent_token_init_script_and_url() {
    // The Coder agent that wsagent supervises needs its token and init script; wsagent's
    // own control-plane client needs the URL (with the in-cluster override).
    for (dir, tf) in templates() {
        let env = container_env(&tf);
        refers(&env, "CODER_AGENT_TOKEN", "coder_agent.main.token", dir);
        refers(
            &env,
            "CODER_AGENT_INIT_SCRIPT",
            "coder_agent.main.init_script",
            dir,
        );
        refers(&env, "CODER_AGENT_URL", "local.agent_url", dir);
        let url = source(local(&tf, "agent_url"));
        assert!(
            url.contains("var.coder_internal_url") && url.contains("access_url"),
            "{dir}: agent_url = `{url}` should prefer var.coder_internal_url over the access URL"
        );
        // No long-lived git token in the pod spec: wsagent fetches fresh ones.
        for (name, e) in &env {
            assert!(
                !source(e).contains("coder_external_auth"),
                "{dir}: env {name} leaks an external-auth token into the pod spec"
            );
        }
    }
}

#[test]
fn the_workspace_and_owner_names_reach_wsagent() {
    // wsagent names the snapshot ref after CODER_WORKSPACE_NAME and authors save commits
    // as the owner: both templates pass them from the workspace and owner data sources.
    for (dir, tf) in templates() {
        let env = container_env(&tf);
        refers(
            &env,
            "CODER_WORKSPACE_NAME",
            "data.coder_workspace.me.name",
            dir,
        );
        refers(
            &env,
            "CODER_WORKSPACE_OWNER_NAME",
            "data.coder_workspace_owner.me.name",
            dir,
        );
        refers(
            &env,
            "CODER_WORKSPACE_OWNER_EMAIL",
            "data.coder_workspace_owner.me.email",
            dir,
        );
        block(&tf, "data", &["coder_workspace", "me"]);
        block(&tf, "data", &["coder_workspace_owner", "me"]);
    }
}

#[test]
fn cpu_memory_and_image_are_mutable_parameters_the_container_uses() {
    // The user picks CPU, memory and image (and may change them later); the container's
    // limits and image come from those parameters, not from fixed values.
    for (dir, tf) in templates() {
        for name in ["cpu", "memory", "image"] {
            assert_eq!(
                attr(parameter(&tf, name), "mutable"),
                &Expression::Bool(true),
                "{dir}: parameter {name} should be mutable"
            );
        }
        let c = container(&tf);
        assert_eq!(
            source(attr(c, "image")),
            "data.coder_parameter.image.value",
            "{dir}: the container's image"
        );
        let limits = object(attr(path(c, &["resources"]), "limits"));
        let limit = |k: &str| {
            source(
                limits
                    .get(k)
                    .unwrap_or_else(|| panic!("{dir}: no {k} limit")),
            )
        };
        assert!(
            limit("cpu").contains("data.coder_parameter.cpu.value"),
            "{dir}: cpu limit `{}`",
            limit("cpu")
        );
        assert!(
            limit("memory").contains("data.coder_parameter.memory.value"),
            "{dir}: memory limit `{}`",
            limit("memory")
        );
    }
}

#[test]
fn the_dotfiles_parameter_reaches_dotfiles_uri() {
    // wsagent's startup pipeline clones the dotfiles named by DOTFILES_URI: the user's
    // (mutable, optional) dotfiles parameter must be what the container gets.
    for (dir, tf) in templates() {
        let p = parameter(&tf, "dotfiles_uri");
        assert_eq!(attr(p, "mutable"), &Expression::Bool(true), "{dir}");
        assert_eq!(
            attr(p, "default"),
            &Expression::String(String::new()),
            "{dir}"
        );
        let env = container_env(&tf);
        let e = env
            .get("DOTFILES_URI")
            .unwrap_or_else(|| panic!("{dir}: no env DOTFILES_URI"));
        assert_eq!(
            source(e),
            "data.coder_parameter.dotfiles_uri.value",
            "{dir}"
        );
    }
}

#[test]
fn startup_and_readiness_probes_run_wsagent_status_ready_and_there_is_no_liveness_probe() {
    // The pod is ready when wsagent's lifecycle is; no liveness probe may kill a healthy
    // workspace that is busy saving.
    for (dir, tf) in templates() {
        let c = container(&tf);
        for probe in ["startup_probe", "readiness_probe"] {
            let exec = path(c, &[probe, "exec"]);
            assert_eq!(
                command(&tf, attr(exec, "command")),
                READY_COMMAND,
                "{dir}: {probe}"
            );
        }
        assert_eq!(
            blocks(c, "liveness_probe").count(),
            0,
            "{dir}: a liveness probe could kill a workspace busy saving"
        );
    }
}

#[test]
fn providers_are_pinned_with_a_pessimistic_constraint() {
    // A new major provider release must not change what a template means unnoticed:
    // every required provider has a `~>` version constraint.
    for (dir, tf) in templates() {
        let terraform = block(&tf, "terraform", &[]).body();
        let required = path(terraform, &["required_providers"]);
        let mut n = 0;
        for a in required.attributes() {
            let p = object(a.expr());
            let version = match p.get("version") {
                Some(Expression::String(v)) => v.clone(),
                other => panic!(
                    "{dir}: provider {} has no literal version: {other:?}",
                    a.key()
                ),
            };
            assert!(
                version.trim_start().starts_with("~>"),
                "{dir}: provider {} is pinned with `{version}`, not `~>`",
                a.key()
            );
            n += 1;
        }
        assert!(n >= 2, "{dir}: coder and kubernetes providers expected");
    }
}

#[test]
fn github_external_auth_is_optional() {
    // A user who has not linked GitHub still gets a workspace (the save then reports the
    // missing token); linking is offered, not required.
    for (dir, tf) in templates() {
        let auth = block(&tf, "data", &["coder_external_auth", "github"]).body();
        assert_eq!(attr(auth, "optional"), &Expression::Bool(true), "{dir}");
    }
}

#[test]
fn the_dashboard_metadata_runs_wsagent_status_short() {
    // The workspace page shows wsagent's one-line status.
    for (dir, tf) in templates() {
        let agent = block(&tf, "resource", &["coder_agent", "main"]).body();
        let scripts: Vec<String> = blocks(agent, "metadata")
            .map(|m| source(attr(m.body(), "script")))
            .collect();
        assert!(
            scripts.iter().any(|s| s == "\"wsagent status --short\""),
            "{dir}: metadata scripts {scripts:?}"
        );
    }
}

#[test]
fn every_kubernetes_object_carries_coders_labels_and_annotation() {
    // Coder's tooling and `kubectl -l com.coder.workspace.id=...` find a workspace's objects
    // by the labels Coder's own templates set; the owner's email is an annotation.
    for (dir, tf) in templates() {
        let mut checked = 0;
        for r in
            blocks(&tf, "resource").filter(|r| r.labels()[0].as_str().starts_with("kubernetes_"))
        {
            let what = format!(
                "{dir}: {}.{}",
                r.labels()[0].as_str(),
                r.labels()[1].as_str()
            );
            let mut metas = vec![path(r.body(), &["metadata"])];
            if r.labels()[0].as_str() == "kubernetes_deployment" {
                metas.push(path(r.body(), &["spec", "template", "metadata"]));
            }
            for meta in metas {
                let labels = object_or_local(&tf, attr(meta, "labels"));
                for l in CODER_LABELS {
                    assert!(labels.contains_key(l), "{what}: no label {l}");
                }
                let annotations = object_or_local(&tf, attr(meta, "annotations"));
                assert!(
                    annotations.contains_key("com.coder.user.email"),
                    "{what}: no annotation com.coder.user.email"
                );
            }
            checked += 1;
        }
        assert!(checked >= 2, "{dir}: expected PVCs and a Deployment");
    }
}

#[test]
fn workspace_stop_runs_the_prestop_shutdown_and_the_shutdown_script_joins_the_save() {
    // preStop runs wsagent's whole stop sequence; the Coder agent's shutdown_script runs
    // after wsagent SIGTERMs it (last) and may only join the save (`wsagent save`).
    for (dir, tf) in templates() {
        let agent = block(&tf, "resource", &["coder_agent", "main"]).body();
        assert_eq!(
            attr(agent, "shutdown_script"),
            &Expression::String("wsagent save".into()),
            "{dir}"
        );
        let exec = path(container(&tf), &["lifecycle", "pre_stop", "exec"]);
        assert_eq!(
            command(&tf, attr(exec, "command")),
            ["/usr/local/bin/wsagent", "shutdown", "--wait"],
            "{dir}: preStop"
        );
    }
}

#[test]
fn the_grace_period_covers_the_shutdown_budget_plus_a_margin() {
    // Kubernetes SIGKILLs terminationGracePeriodSeconds after SIGTERM: wsagent's budget
    // (WSAGENT_SHUTDOWN_BUDGET) must end well before that.
    for (dir, tf) in templates() {
        let ctx = context(&tf);
        let grace = eval_i64(
            &ctx,
            attr(pod_spec(&tf), "termination_grace_period_seconds"),
        );
        let env = container_env(&tf);
        let budget_expr = env
            .get("WSAGENT_SHUTDOWN_BUDGET")
            .unwrap_or_else(|| panic!("{dir}: the container has no env WSAGENT_SHUTDOWN_BUDGET"));
        let budget = match budget_expr.evaluate(&ctx) {
            Ok(Value::String(s)) => s,
            other => {
                panic!("{dir}: WSAGENT_SHUTDOWN_BUDGET does not evaluate to a string: {other:?}")
            }
        };
        let budget_seconds: i64 = budget
            .strip_suffix('s')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| {
                panic!("{dir}: WSAGENT_SHUTDOWN_BUDGET = {budget:?}: want \"<N>s\"")
            });
        assert!(budget_seconds > 0);
        assert!(
            grace >= budget_seconds + MIN_MARGIN_SECONDS,
            "{dir}: terminationGracePeriodSeconds {grace} < budget {budget_seconds}s + margin \
             {MIN_MARGIN_SECONDS}s: SIGKILL would cut the git save"
        );
    }
}

#[test]
fn envbuilder_execs_wsagent_as_the_init_process() {
    // In the devcontainer template the container runs envbuilder, which builds the
    // devcontainer and then execs ENVBUILDER_INIT_COMMAND with ENVBUILDER_INIT_ARGS: that
    // must be `wsagent run`, at the path the devcontainer Feature installs it to.
    let tf = template_at(DEVCONTAINER);
    let env = container_env(&tf);
    let literal = |name: &str| match env.get(name) {
        Some(Expression::String(s)) => s.clone(),
        other => panic!("env {name} is not a literal: {other:?}"),
    };
    assert_eq!(literal("ENVBUILDER_INIT_COMMAND"), "/usr/local/bin/wsagent");
    assert_eq!(literal("ENVBUILDER_INIT_ARGS"), "run");
    assert!(
        !env.contains_key("ENVBUILDER_INIT_SCRIPT"),
        "ENVBUILDER_INIT_ARGS replaces `-c $ENVBUILDER_INIT_SCRIPT`: the agent's init script \
         goes in CODER_AGENT_INIT_SCRIPT"
    );
    refers(
        &env,
        "ENVBUILDER_GIT_URL",
        "data.coder_parameter.repo.value",
        DEVCONTAINER,
    );
    let c = container(&tf);
    assert!(
        c.attributes()
            .all(|a| a.key() != "command" && a.key() != "args"),
        "the container must run envbuilder's own ENTRYPOINT"
    );
    // The Feature installs the binary where the init command expects it.
    let install =
        std::fs::read_to_string(crate::repo_root().join("images/devcontainer-feature/install.sh"))
            .expect("read install.sh");
    assert!(
        install.contains("BIN=$ROOT/usr/local/bin/wsagent\n"),
        "install.sh should install /usr/local/bin/wsagent"
    );
    let feature: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            crate::repo_root().join("images/devcontainer-feature/devcontainer-feature.json"),
        )
        .expect("read devcontainer-feature.json"),
    )
    .expect("devcontainer-feature.json is JSON");
    assert_eq!(feature["id"], "wsagent");
    assert!(
        feature.get("entrypoint").is_none(),
        "envbuilder ignores a Feature's entrypoint: the template sets the init command"
    );
}

#[test]
fn the_devcontainer_home_and_workspaces_are_persistent() {
    // The devcontainer template keeps the user's home (wsagent's state and save journal)
    // and /workspaces (envbuilder's clone) on PVCs the Deployment mounts.
    let tf = template_at(DEVCONTAINER);
    let mounts: BTreeMap<String, String> = blocks(container(&tf), "volume_mount")
        .map(|m| {
            (
                source(attr(m.body(), "name")),
                source(attr(m.body(), "mount_path")),
            )
        })
        .collect();
    assert_eq!(
        mounts.get("\"home\"").map(String::as_str),
        Some("var.home_path")
    );
    assert_eq!(
        mounts.get("\"workspaces\"").map(String::as_str),
        Some("\"/workspaces\"")
    );
    for pvc in ["home", "workspaces"] {
        block(
            &tf,
            "resource",
            &["kubernetes_persistent_volume_claim", pvc],
        );
    }
}

/// Run the Feature's install.sh (as `sh`, the way envbuilder's `./install.sh` runs it
/// with /bin/sh) into a scratch root, with the wsagent binary and the base config packaged
/// next to it as at publish time; the effective config (`wsagent config show`) it gives.
fn install_feature(user: &str) -> (tempfile::TempDir, String) {
    let feature = tempfile::tempdir().expect("tempdir");
    let root = tempfile::tempdir().expect("tempdir");
    let src = crate::repo_root().join("images/devcontainer-feature");
    std::fs::copy(src.join("install.sh"), feature.path().join("install.sh")).expect("copy");
    std::fs::copy(
        crate::repo_root().join("images/base/config.toml"),
        feature.path().join("config.toml"),
    )
    .expect("copy config");
    std::fs::copy(integration::wsagent_bin(), feature.path().join("wsagent")).expect("copy bin");
    let out = std::process::Command::new("sh")
        .arg(feature.path().join("install.sh"))
        .env("WSAGENT_FEATURE_DESTDIR", root.path())
        .env("USERNAME", user)
        .env("_CONTAINER_USER", "")
        .env("_REMOTE_USER", "")
        .output()
        .expect("run install.sh");
    assert!(
        out.status.success(),
        "install.sh as {user}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = root.path().join("usr/local/bin/wsagent");
    let config = root.path().join("etc/wsagent/config.toml");
    let check = std::process::Command::new(&bin)
        .args(["config", "check"])
        .arg(&config)
        .output()
        .expect("wsagent config check");
    assert!(
        check.status.success(),
        "the installed config is invalid: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let show = std::process::Command::new(&bin)
        .args(["config", "show"])
        .env("WSAGENT_SYSTEM_CONFIG", &config)
        .output()
        .expect("wsagent config show");
    assert!(show.status.success(), "wsagent config show failed");
    (root, String::from_utf8(show.stdout).expect("UTF-8"))
}

/// The home directory of `user` in this machine's passwd, if it has that user.
fn home_of(user: &str) -> Option<String> {
    let out = std::process::Command::new("getent")
        .args(["passwd", user])
        .output()
        .ok()?;
    let line = String::from_utf8(out.stdout).ok()?;
    line.trim_end().split(':').nth(5).map(str::to_string)
}

#[test]
fn the_feature_installs_wsagent_with_a_config_for_the_user_it_runs_as() {
    // Under envbuilder wsagent runs as the devcontainer's user, not root: the installed
    // config must be valid, switch no users, not run dockerd, and (for a non-root user)
    // put the socket and state where that user can create them.
    for user in ["root", "nobody"] {
        let Some(home) = home_of(user) else {
            eprintln!("no user {user} on this machine: skipped");
            continue;
        };
        let (_root, effective) = install_feature(user);
        let line = |l: &str| effective.lines().any(|x| x == l);
        assert!(
            !effective.lines().any(|l| l.starts_with("user = ")),
            "{user}: a service switches users:\n{effective}"
        );
        assert!(
            !line("[services.dockerd]"),
            "{user}: dockerd is still a service:\n{effective}"
        );
        assert!(
            line("[services.coder-agent]"),
            "{user}: no coder-agent service"
        );
        assert!(
            line(&format!("state_dir = \"{home}/.local/state/wsagent\"")),
            "{user}: state_dir not in {home}:\n{effective}"
        );
        let socket = if user == "root" {
            "/run/wsagent/wsagent.sock".to_string()
        } else {
            format!("{home}/.local/state/wsagent/wsagent.sock")
        };
        assert!(
            line(&format!("socket = \"{socket}\"")),
            "{user}: socket should be {socket}:\n{effective}"
        );
        assert!(
            line(&format!("WSAGENT_SOCKET = \"{socket}\"")),
            "{user}: the Coder agent's WSAGENT_SOCKET should be {socket}"
        );
    }
}

/// Run `scripts/gen-codertemplate --out <dir>`.
fn generate_codertemplates(out: &std::path::Path) {
    let status = std::process::Command::new("python3")
        .arg(crate::repo_root().join("scripts/gen-codertemplate"))
        .arg("--out")
        .arg(out)
        .status()
        .expect("run python3 scripts/gen-codertemplate (python3 must be installed)");
    assert!(
        status.success(),
        "scripts/gen-codertemplate failed: {status}"
    );
}

#[test]
fn each_committed_codertemplate_yaml_is_what_the_script_generates() {
    // codertemplate.yaml is generated, never edited: it fails here until
    // `scripts/gen-codertemplate` has been re-run after a change to a template.
    let tmp = tempfile::tempdir().expect("tempdir");
    generate_codertemplates(tmp.path());
    for dir in TEMPLATES {
        let name = dir.rsplit('/').next().expect("dir name");
        let committed = crate::repo_root().join(dir).join("codertemplate.yaml");
        let committed =
            std::fs::read(&committed).unwrap_or_else(|e| panic!("{}: {e}", committed.display()));
        let generated = std::fs::read(tmp.path().join(name).join("codertemplate.yaml"))
            .expect("generated yaml");
        assert!(
            committed == generated,
            "{dir}/codertemplate.yaml is stale: run scripts/gen-codertemplate and commit it"
        );
    }
}

/// `spec.files` of a codertemplate.yaml as the generator writes it (4-space keys, 6-space
/// literal block scalars with clip, strip or keep chomping).
fn codertemplate_files(yaml: &str) -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    let mut lines = yaml
        .lines()
        .skip_while(|l| *l != "  files:")
        .skip(1)
        .peekable();
    while let Some(line) = lines.next() {
        let (key, header) = line
            .strip_prefix("    ")
            .and_then(|l| l.split_once(": |"))
            .unwrap_or_else(|| panic!("not a file entry: {line:?}"));
        let mut body = Vec::new();
        while let Some(next) = lines.peek() {
            if next.is_empty() || next.starts_with("      ") {
                body.push(next.strip_prefix("      ").unwrap_or(""));
                lines.next();
            } else {
                break;
            }
        }
        let mut text = body.join("\n");
        match header {
            "" => {
                text = text.trim_end_matches('\n').to_string();
                text.push('\n');
            }
            "-" => text = text.trim_end_matches('\n').to_string(),
            "+" => text.push('\n'),
            other => panic!("block header `|{other}` is not handled here"),
        }
        files.insert(key.to_string(), text);
    }
    files
}

#[test]
fn each_codertemplate_yaml_carries_its_templates_files_unchanged() {
    // Applying the CoderTemplate must push exactly the files next to it: spec.files holds
    // every file of the template directory (but the yaml), byte for byte, and the resource
    // has the shape coder-k8s serves.
    for dir in TEMPLATES {
        let root = crate::repo_root().join(dir);
        let yaml = std::fs::read_to_string(root.join("codertemplate.yaml")).expect("read yaml");
        assert!(
            yaml.contains("\napiVersion: aggregation.coder.com/v1alpha1\nkind: CoderTemplate\n")
        );
        assert!(
            yaml.contains("\nspec:\n  organization: "),
            "{dir}: spec.organization"
        );
        assert!(
            yaml.contains("\n  versionID: \"\"\n"),
            "{dir}: an empty spec.versionID"
        );
        // coder-k8s names a CoderTemplate `<organization>.<template>`.
        let value = |prefix: &str| {
            yaml.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .map(|v| v.trim_matches('"').to_string())
                .unwrap_or_else(|| panic!("{dir}: no `{prefix}` line"))
        };
        let org = value("  organization: ");
        assert!(
            value("  name: ").starts_with(&format!("{org}.")),
            "{dir}: metadata.name must start with the organization `{org}.`"
        );
        let files = codertemplate_files(&yaml);
        let mut want = BTreeMap::new();
        for e in std::fs::read_dir(&root).expect("read template dir") {
            let e = e.expect("dir entry");
            let name = e.file_name().into_string().expect("UTF-8 name");
            if name != "codertemplate.yaml" && !name.starts_with('.') {
                want.insert(name, std::fs::read_to_string(e.path()).expect("read file"));
            }
        }
        assert!(
            want.contains_key("main.tf") && want.contains_key("README.md"),
            "{dir}"
        );
        assert_eq!(
            files.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{dir}: spec.files names"
        );
        for (name, text) in &want {
            assert!(
                files[name] == *text,
                "{dir}: spec.files[{name}] differs from {name}"
            );
        }
    }
}

#[test]
fn the_home_docker_and_linuxbrew_volumes_are_persistent() {
    // What must survive a workspace restart lives on PVCs; the deployment mounts them.
    let tf = template();
    let mounts: BTreeMap<String, String> = blocks(container(&tf), "volume_mount")
        .map(|m| {
            (
                source(attr(m.body(), "name")),
                source(attr(m.body(), "mount_path")),
            )
        })
        .collect();
    for (pvc, mount) in [
        ("home", "/home/coder"),
        ("docker", "/var/lib/docker"),
        ("linuxbrew", "/home/linuxbrew"),
    ] {
        block(
            &tf,
            "resource",
            &["kubernetes_persistent_volume_claim", pvc],
        );
        assert_eq!(
            mounts.get(&format!("\"{pvc}\"")).map(String::as_str),
            Some(format!("\"{mount}\"").as_str()),
            "volume {pvc} should be mounted at {mount}"
        );
        let volume = blocks(pod_spec(&tf), "volume")
            .find(|v| source(attr(v.body(), "name")) == format!("\"{pvc}\""))
            .unwrap_or_else(|| panic!("no volume {pvc}"));
        let claim = source(attr(
            path(volume.body(), &["persistent_volume_claim"]),
            "claim_name",
        ));
        assert!(
            claim.contains(&format!("kubernetes_persistent_volume_claim.{pvc}.")),
            "volume {pvc} claims {claim}"
        );
    }
}

#[test]
fn code_server_is_an_app_with_its_healthz_check() {
    let tf = template();
    let app = block(&tf, "resource", &["coder_app", "code-server"]).body();
    assert!(source(attr(app, "agent_id")).contains("coder_agent.main.id"));
    let hc = path(app, &["healthcheck"]);
    assert_eq!(
        attr(hc, "url"),
        &Expression::String("http://localhost:13337/healthz".into())
    );
}
