//! The Coder template's wiring, checked by parsing `images/coder-template/main.tf`: the
//! agent token and init script reach the container, the stop hooks call wsagent, and
//! Kubernetes' SIGKILL cannot arrive before wsagent's shutdown budget is spent.
//!
//! Terraform cannot run here (no provider downloads), so the `locals` the deadlines are
//! computed from are evaluated with hcl-rs, with `var.*` bound to the variables' defaults.

use std::collections::BTreeMap;

use hcl::eval::{Context, Evaluate};
use hcl::{Block, Body, Expression, Value};

/// The smallest margin between the grace period and wsagent's budget that we accept: the
/// preStop exec's start, the final report and log flush, the kubelet's slack.
const MIN_MARGIN_SECONDS: i64 = 5;

fn template() -> Body {
    let path = crate::repo_root().join("images/coder-template/main.tf");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    hcl::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
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

/// The container's `env` blocks as name -> value expression.
fn container_env(c: &Body) -> BTreeMap<String, Expression> {
    blocks(c, "env")
        .map(|e| {
            let name = match attr(e.body(), "name") {
                Expression::String(s) => s.clone(),
                other => panic!("env name is not a literal: {other:?}"),
            };
            (name, attr(e.body(), "value").clone())
        })
        .collect()
}

#[test]
fn the_container_gets_the_agent_token_init_script_and_url() {
    // The Coder agent that wsagent supervises needs its token and init script; wsagent's
    // own control-plane client needs the URL (with the in-cluster override).
    let tf = template();
    let env = container_env(container(&tf));
    let refers = |name: &str, to: &str| {
        let e = env
            .get(name)
            .unwrap_or_else(|| panic!("the container has no env {name}"));
        assert!(
            source(e).contains(to),
            "env {name} = `{}` should refer to {to}",
            source(e)
        );
    };
    refers("CODER_AGENT_TOKEN", "coder_agent.main.token");
    refers("CODER_AGENT_INIT_SCRIPT", "coder_agent.main.init_script");
    refers("CODER_AGENT_URL", "local.agent_url");
    let locals = blocks(&tf, "locals").next().expect("a locals block").body();
    let url = source(attr(locals, "agent_url"));
    assert!(
        url.contains("var.coder_internal_url") && url.contains("access_url"),
        "agent_url = `{url}` should prefer var.coder_internal_url over the access URL"
    );
    // No long-lived git token in the pod spec: wsagent fetches fresh ones.
    for (name, e) in &env {
        assert!(
            !source(e).contains("coder_external_auth"),
            "env {name} leaks an external-auth token into the pod spec"
        );
    }
    block(&tf, "data", &["coder_external_auth", "github"]);
}

#[test]
fn workspace_stop_runs_wsagent_save_and_the_prestop_shutdown() {
    // Coder's shutdown_script saves while the agent is up; the preStop hook runs the
    // whole stop sequence before Kubernetes' SIGTERM.
    let tf = template();
    let agent = block(&tf, "resource", &["coder_agent", "main"]).body();
    assert_eq!(
        attr(agent, "shutdown_script"),
        &Expression::String("wsagent save".into())
    );
    let exec = path(container(&tf), &["lifecycle", "pre_stop", "exec"]);
    let command = source(attr(exec, "command"));
    let want = r#"["/usr/local/bin/wsagent", "shutdown", "--wait"]"#;
    assert_eq!(
        command.split_whitespace().collect::<String>(),
        want.split_whitespace().collect::<String>()
    );
}

#[test]
fn the_grace_period_covers_the_shutdown_budget_plus_a_margin() {
    // Kubernetes SIGKILLs terminationGracePeriodSeconds after SIGTERM: wsagent's budget
    // (WSAGENT_SHUTDOWN_BUDGET) must end well before that.
    let tf = template();
    let ctx = context(&tf);
    let grace = eval_i64(
        &ctx,
        attr(pod_spec(&tf), "termination_grace_period_seconds"),
    );
    let env = container_env(container(&tf));
    let budget_expr = env
        .get("WSAGENT_SHUTDOWN_BUDGET")
        .expect("the container has no env WSAGENT_SHUTDOWN_BUDGET");
    let budget = match budget_expr.evaluate(&ctx) {
        Ok(Value::String(s)) => s,
        other => panic!("WSAGENT_SHUTDOWN_BUDGET does not evaluate to a string: {other:?}"),
    };
    let budget_seconds: i64 = budget
        .strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("WSAGENT_SHUTDOWN_BUDGET = {budget:?}: want \"<N>s\""));
    assert!(budget_seconds > 0);
    assert!(
        grace >= budget_seconds + MIN_MARGIN_SECONDS,
        "terminationGracePeriodSeconds {grace} < budget {budget_seconds}s + margin \
         {MIN_MARGIN_SECONDS}s: SIGKILL would cut the git save"
    );
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
