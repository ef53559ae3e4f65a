//! The Kubernetes base in `deploy/kubernetes`, rendered by `kubectl kustomize` as a user renders
//! it, and checked for what the deployment relies on: two hardened replicas probed on the admin
//! port, `toolgate check` before a pod serves, the admin token from a Secret, the policies and the
//! server config from ConfigMaps that agree with the pod, and the admin port kept off the agents'
//! network.
//!
//! Needs `kubectl` (kustomize is built into it) on the `PATH`; nothing talks to a cluster.

use std::process::Command;

use saphyr::{LoadableYamlNode, YamlOwned};

/// The labels of an agent's pod, as `networkpolicy.yaml` expects them (deploy/kubernetes/README.md).
const AGENT: &[(&str, &str)] = &[("toolgate.io/role", "agent")];
/// The labels of an operator's (or monitoring's) pod.
const OPERATOR: &[(&str, &str)] = &[("toolgate.io/role", "operator")];
const DATA_PORT: i64 = 8080;
const ADMIN_PORT: i64 = 9090;

/// `kubectl kustomize deploy/kubernetes`, run from the crate root: every rendered object.
fn render() -> Vec<YamlOwned> {
    let out = Command::new("kubectl")
        .args(["kustomize", "deploy/kubernetes"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `kubectl kustomize deploy/kubernetes` (these tests need kubectl on the PATH): {e}")
        });
    assert!(
        out.status.success(),
        "`kubectl kustomize deploy/kubernetes` failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("kubectl prints UTF-8");
    let objects: Vec<YamlOwned> = YamlOwned::load_from_str(&text)
        .unwrap_or_else(|e| panic!("the rendered manifests are not YAML: {e}\n{text}"))
        .into_iter()
        .filter(YamlOwned::is_mapping)
        .collect();
    assert!(
        !objects.is_empty(),
        "`kubectl kustomize deploy/kubernetes` rendered nothing"
    );
    objects
}

// ---------- reading the YAML ----------

/// The node at `path` (mapping keys, outermost first), if every key is there.
fn lookup<'a>(node: &'a YamlOwned, path: &[&str]) -> Option<&'a YamlOwned> {
    path.iter().try_fold(node, |n, key| n.as_mapping_get(key))
}

/// The node at `path`, or a panic naming the path.
fn at<'a>(node: &'a YamlOwned, path: &[&str]) -> &'a YamlOwned {
    lookup(node, path).unwrap_or_else(|| panic!("`{}` is missing", path.join(".")))
}

/// The string at `path`, if there is one.
fn str_at<'a>(node: &'a YamlOwned, path: &[&str]) -> Option<&'a str> {
    lookup(node, path).and_then(YamlOwned::as_str)
}

/// The sequence at `path`; none there reads as empty.
fn seq<'a>(node: &'a YamlOwned, path: &[&str]) -> &'a [YamlOwned] {
    lookup(node, path)
        .and_then(YamlOwned::as_sequence)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// The strings of the sequence at `path` (a container's `args`, say).
fn strings<'a>(node: &'a YamlOwned, path: &[&str]) -> Vec<&'a str> {
    seq(node, path).iter().filter_map(YamlOwned::as_str).collect()
}

/// The entry of the sequence at `path` whose `name` is `name`.
fn named<'a>(node: &'a YamlOwned, path: &[&str], name: &str) -> Option<&'a YamlOwned> {
    seq(node, path).iter().find(|e| str_at(e, &["name"]) == Some(name))
}

/// Every rendered object of a kind.
fn of_kind<'a>(objects: &'a [YamlOwned], kind: &str) -> Vec<&'a YamlOwned> {
    objects.iter().filter(|o| str_at(o, &["kind"]) == Some(kind)).collect()
}

/// The rendered object of a kind and name.
fn object<'a>(objects: &'a [YamlOwned], kind: &str, name: &str) -> &'a YamlOwned {
    of_kind(objects, kind)
        .into_iter()
        .find(|o| str_at(o, &["metadata", "name"]) == Some(name))
        .unwrap_or_else(|| panic!("no {kind} named `{name}` in the rendered manifests"))
}

// ---------- pods, ports, selectors ----------

/// The Deployment `toolgate`.
fn deployment(objects: &[YamlOwned]) -> &YamlOwned {
    object(objects, "Deployment", "toolgate")
}

/// The pod spec of the Deployment.
fn pod_spec(deployment: &YamlOwned) -> &YamlOwned {
    at(deployment, &["spec", "template", "spec"])
}

/// The labels of the Deployment's pods.
fn pod_labels(deployment: &YamlOwned) -> Vec<(&str, &str)> {
    lookup(deployment, &["spec", "template", "metadata", "labels"])
        .and_then(YamlOwned::as_mapping)
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.as_str()?, v.as_str()?))).collect())
        .unwrap_or_default()
}

fn label<'a>(labels: &[(&'a str, &'a str)], key: &str) -> Option<&'a str> {
    labels.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

/// The container that runs `toolgate serve`.
fn serving_container(pod: &YamlOwned) -> &YamlOwned {
    seq(pod, &["containers"])
        .iter()
        .find(|c| strings(c, &["args"]).contains(&"serve"))
        .expect("a container of the Deployment runs `toolgate serve` (its args contain `serve`)")
}

/// Every container of the pod, init containers first.
fn all_containers(pod: &YamlOwned) -> Vec<&YamlOwned> {
    seq(pod, &["initContainers"])
        .iter()
        .chain(seq(pod, &["containers"]))
        .collect()
}

/// The argument after `flag` (`--config`'s file, say).
fn flag_value<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| *a == flag)
        .and_then(|i| args.get(i + 1))
        .copied()
}

/// The number a port reference stands for: a number, or the name of one of the container's ports.
fn port_number(container: &YamlOwned, port: &YamlOwned) -> Option<i64> {
    port.as_integer().or_else(|| {
        let name = port.as_str()?;
        named(container, &["ports"], name).and_then(|p| lookup(p, &["containerPort"])?.as_integer())
    })
}

/// Whether a label selector (`matchLabels` and `matchExpressions`) selects a pod with `labels`.
/// An empty selector selects every pod.
fn selects(selector: &YamlOwned, labels: &[(&str, &str)]) -> bool {
    let match_labels = lookup(selector, &["matchLabels"]).and_then(YamlOwned::as_mapping);
    let by_labels = match_labels.is_none_or(|m| {
        m.iter()
            .all(|(k, v)| k.as_str().is_some_and(|k| label(labels, k) == v.as_str()))
    });
    let by_expressions = seq(selector, &["matchExpressions"]).iter().all(|e| {
        let value = label(labels, str_at(e, &["key"]).unwrap_or_default());
        let values = strings(e, &["values"]);
        match (str_at(e, &["operator"]), value) {
            (Some("In"), Some(v)) => values.contains(&v),
            (Some("NotIn"), v) => v.is_none_or(|v| !values.contains(&v)),
            (Some("Exists"), v) => v.is_some(),
            (Some("DoesNotExist"), v) => v.is_none(),
            _ => false,
        }
    });
    by_labels && by_expressions
}

/// The env entry `name` of a container.
fn env<'a>(container: &'a YamlOwned, name: &str) -> Option<&'a YamlOwned> {
    named(container, &["env"], name)
}

/// The Secret reference of a container's env entry `name`, asserting it is one: never a literal
/// value, and not optional (the variable a config names must be there).
fn secret_env<'a>(container: &'a YamlOwned, name: &str) -> &'a YamlOwned {
    let who = str_at(container, &["name"]).unwrap_or("?");
    let entry = env(container, name).unwrap_or_else(|| panic!("container `{who}` has no env {name}"));
    assert!(
        lookup(entry, &["value"]).is_none(),
        "container `{who}`: env {name} must not hold a literal value in the manifests"
    );
    let secret = lookup(entry, &["valueFrom", "secretKeyRef"])
        .unwrap_or_else(|| panic!("container `{who}`: env {name} must come from a Secret (valueFrom.secretKeyRef)"));
    assert!(
        str_at(secret, &["name"]).is_some_and(|n| !n.is_empty()) && str_at(secret, &["key"]).is_some(),
        "container `{who}`: env {name}'s secretKeyRef must name a Secret and a key"
    );
    assert!(
        lookup(secret, &["optional"]).and_then(YamlOwned::as_bool) != Some(true),
        "container `{who}`: env {name}'s Secret must not be optional"
    );
    secret
}

/// The ConfigMap (by its rendered, hash-suffixed name) behind the pod's volume `volume`.
fn config_map_of_volume<'a>(objects: &'a [YamlOwned], pod: &YamlOwned, volume: &str) -> &'a YamlOwned {
    let volume_node = named(pod, &["volumes"], volume).unwrap_or_else(|| panic!("the pod has no volume `{volume}`"));
    let name = str_at(volume_node, &["configMap", "name"])
        .unwrap_or_else(|| panic!("the pod's volume `{volume}` must come from a ConfigMap"));
    object(objects, "ConfigMap", name)
}

/// The container's volume mount at `path` (a trailing `/` does not count).
fn mount_at<'a>(container: &'a YamlOwned, path: &str) -> Option<&'a YamlOwned> {
    seq(container, &["volumeMounts"])
        .iter()
        .find(|m| str_at(m, &["mountPath"]).is_some_and(|p| p.trim_end_matches('/') == path.trim_end_matches('/')))
}

// ---------- the tests ----------

#[test]
fn kustomize_base_renders_a_hardened_two_replica_deployment() {
    let objects = render();
    let deployment = deployment(&objects);
    assert_eq!(
        lookup(deployment, &["spec", "replicas"]).and_then(YamlOwned::as_integer),
        Some(2),
        "the Deployment runs 2 replicas"
    );
    let pod = pod_spec(deployment);
    let toolgate = serving_container(pod);

    let readiness = at(toolgate, &["readinessProbe", "httpGet"]);
    assert_eq!(
        str_at(readiness, &["path"]),
        Some("/readyz"),
        "the readiness probe is GET /readyz"
    );
    assert_eq!(
        port_number(toolgate, at(readiness, &["port"])),
        Some(ADMIN_PORT),
        "the readiness probe is on the admin port {ADMIN_PORT}"
    );
    let liveness = at(toolgate, &["livenessProbe", "httpGet"]);
    assert_eq!(
        str_at(liveness, &["path"]),
        Some("/healthz"),
        "the liveness probe is GET /healthz"
    );
    assert_eq!(
        port_number(toolgate, at(liveness, &["port"])),
        Some(ADMIN_PORT),
        "the liveness probe is on the admin port {ADMIN_PORT}"
    );
    let container_ports: Vec<i64> = seq(toolgate, &["ports"])
        .iter()
        .filter_map(|p| lookup(p, &["containerPort"])?.as_integer())
        .collect();
    assert!(
        container_ports.contains(&DATA_PORT) && container_ports.contains(&ADMIN_PORT),
        "the toolgate container declares the data port {DATA_PORT} and the admin port {ADMIN_PORT}: {container_ports:?}"
    );

    assert_eq!(
        lookup(pod, &["securityContext", "runAsNonRoot"]).and_then(YamlOwned::as_bool),
        Some(true),
        "the pod's securityContext has runAsNonRoot: true"
    );
    assert_eq!(
        lookup(pod, &["securityContext", "runAsUser"]).and_then(YamlOwned::as_integer),
        Some(65532),
        "the pod's securityContext has runAsUser: 65532"
    );
    // toolgate drains calls in flight for up to 10 s on SIGTERM.
    let grace = lookup(pod, &["terminationGracePeriodSeconds"]).and_then(YamlOwned::as_integer);
    assert!(
        grace.is_none_or(|g| g >= 15),
        "terminationGracePeriodSeconds leaves toolgate its 10 s drain (at least 15): {grace:?}"
    );

    let containers = all_containers(pod);
    assert!(
        containers.len() >= 2,
        "the pod has an init container and the toolgate container"
    );
    for c in containers {
        let name = str_at(c, &["name"]).unwrap_or("?");
        let security = at(c, &["securityContext"]);
        assert_eq!(
            lookup(security, &["readOnlyRootFilesystem"]).and_then(YamlOwned::as_bool),
            Some(true),
            "container `{name}` has readOnlyRootFilesystem: true"
        );
        assert_eq!(
            lookup(security, &["allowPrivilegeEscalation"]).and_then(YamlOwned::as_bool),
            Some(false),
            "container `{name}` has allowPrivilegeEscalation: false"
        );
        assert!(
            strings(security, &["capabilities", "drop"]).contains(&"ALL"),
            "container `{name}` drops ALL capabilities"
        );
        assert_ne!(
            lookup(security, &["runAsNonRoot"]).and_then(YamlOwned::as_bool),
            Some(false),
            "container `{name}` does not override runAsNonRoot to false"
        );
        let user = lookup(security, &["runAsUser"]).and_then(YamlOwned::as_integer);
        assert!(
            user.is_none_or(|u| u == 65532),
            "container `{name}` runs as user 65532 (or inherits it): {user:?}"
        );
        let requests = lookup(c, &["resources", "requests"]);
        assert!(
            requests.is_some_and(|r| r.contains_mapping_key("cpu") && r.contains_mapping_key("memory")),
            "container `{name}` has resource requests for cpu and memory"
        );
        assert!(
            lookup(c, &["resources", "limits", "memory"]).is_some(),
            "container `{name}` has a memory limit"
        );
    }
}

#[test]
fn kustomize_base_runs_toolgate_check_in_an_init_container_before_serving() {
    let objects = render();
    let pod = pod_spec(deployment(&objects));
    let toolgate = serving_container(pod);
    let check = seq(pod, &["initContainers"])
        .iter()
        .find(|c| strings(c, &["args"]).contains(&"check"))
        .expect("an init container runs `toolgate check` (its args contain `check`)");

    assert_eq!(
        str_at(check, &["image"]),
        str_at(toolgate, &["image"]),
        "the check init container runs the same image as the toolgate container"
    );
    let serve_config = flag_value(&strings(toolgate, &["args"]), "--config").map(str::to_owned);
    assert!(
        serve_config.is_some(),
        "`toolgate serve` is given its config with --config"
    );
    assert_eq!(
        flag_value(&strings(check, &["args"]), "--config").map(str::to_owned),
        serve_config,
        "`toolgate check` checks the config file `toolgate serve` runs with"
    );
    // Same mounts: the config and the policies `serve` will read are the ones `check` read.
    for mount in seq(toolgate, &["volumeMounts"]) {
        let path = str_at(mount, &["mountPath"]).unwrap_or_default();
        if path.starts_with("/etc/toolgate") {
            assert_eq!(
                mount_at(check, path),
                Some(mount),
                "the check init container mounts {path} as the toolgate container does"
            );
        }
    }
    // With `state: redis://…`, `check` connects to Redis as `serve` does.
    if env(toolgate, "TOOLGATE_REDIS_PASSWORD").is_some() {
        assert_eq!(
            env(check, "TOOLGATE_REDIS_PASSWORD"),
            env(toolgate, "TOOLGATE_REDIS_PASSWORD"),
            "the check init container gets the Redis password as the toolgate container does"
        );
    }
}

#[test]
fn kustomize_base_takes_the_admin_token_from_a_secret_and_the_policies_from_a_config_map() {
    let objects = render();
    let pod = pod_spec(deployment(&objects));
    let toolgate = serving_container(pod);

    secret_env(toolgate, "TOOLGATE_ADMIN_TOKEN");
    assert!(
        of_kind(&objects, "Secret").is_empty(),
        "the base renders no Secret: the admin token and the Redis password are the user's (README.md)"
    );

    let mount = mount_at(toolgate, "/etc/toolgate/policies")
        .expect("the toolgate container mounts the policies at /etc/toolgate/policies/");
    assert_eq!(
        lookup(mount, &["readOnly"]).and_then(YamlOwned::as_bool),
        Some(true),
        "the policies are mounted read-only"
    );
    let volume = str_at(mount, &["name"]).expect("the policies mount names its volume");
    let policies = config_map_of_volume(&objects, pod, volume);
    assert!(
        lookup(policies, &["data", "agents.yaml"])
            .and_then(YamlOwned::as_str)
            .is_some(),
        "the policies ConfigMap holds agents.yaml"
    );
}

#[test]
fn server_config_in_the_config_map_matches_the_pod() {
    let objects = render();
    let pod = pod_spec(deployment(&objects));
    let toolgate = serving_container(pod);
    let args = strings(toolgate, &["args"]);
    let path = flag_value(&args, "--config").expect("`toolgate serve` is given its config with --config");
    let mount = mount_at(toolgate, path).unwrap_or_else(|| panic!("the config file {path} is mounted"));
    let key = str_at(mount, &["subPath"]).expect("the config file is mounted with subPath");
    let config_map = config_map_of_volume(&objects, pod, str_at(mount, &["name"]).unwrap_or_default());
    let text = str_at(config_map, &["data", key]).unwrap_or_else(|| panic!("the config ConfigMap holds {key}"));
    // toolgate's own parser takes it (listeners, TLS rules, state URL, limits).
    if let Err(e) = toolgate::config::ServerConfig::parse(key, text) {
        panic!("toolgate does not accept the ConfigMap's {key}:\n{e}");
    }
    let docs = YamlOwned::load_from_str(text).unwrap_or_else(|e| panic!("{key} in the ConfigMap is not YAML: {e}"));
    let config = docs.first().expect("the server config is one YAML document");

    let listen = str_at(config, &["listen"]).unwrap_or_default();
    assert_eq!(
        listen, "0.0.0.0:8080",
        "the data plane listens on the pod's addresses, port 8080"
    );
    let admin = str_at(config, &["admin", "listen"]).unwrap_or_default();
    assert_eq!(
        admin, "0.0.0.0:9090",
        "the admin plane listens on the pod's addresses, port 9090"
    );

    let policies = str_at(config, &["policies"]).unwrap_or_default();
    assert!(
        mount_at(toolgate, policies).is_some(),
        "the config's `policies` ({policies}) is where the policies ConfigMap is mounted"
    );
    let state = str_at(config, &["state"]).unwrap_or_default();
    assert!(
        state.starts_with("redis://") || state.starts_with("rediss://"),
        "two replicas share their state through Redis (`state: redis://…`), not `{state}`"
    );
    let password_env = str_at(config, &["redis", "password_env"]).unwrap_or("TOOLGATE_REDIS_PASSWORD");
    secret_env(toolgate, password_env);
    let token_env = str_at(config, &["admin", "token_env"]).unwrap_or("TOOLGATE_ADMIN_TOKEN");
    secret_env(toolgate, token_env);

    // The root filesystem is read-only: the audit file must be on a writable volume.
    let audit = str_at(config, &["audit", "file"]).expect("the config names an audit file");
    let writable = seq(toolgate, &["volumeMounts"]).iter().any(|m| {
        let dir = str_at(m, &["mountPath"]).unwrap_or_default().trim_end_matches('/');
        let read_only = lookup(m, &["readOnly"]).and_then(YamlOwned::as_bool) == Some(true);
        !read_only && !dir.is_empty() && audit.starts_with(&format!("{dir}/"))
    });
    assert!(writable, "the audit file {audit} is on a writable volume mount");
}

#[test]
fn data_plane_service_exposes_port_8080_only() {
    let objects = render();
    let deployment = deployment(&objects);
    let labels = pod_labels(deployment);
    let toolgate = serving_container(pod_spec(deployment));
    let service = object(&objects, "Service", "toolgate");

    let selector = at(service, &["spec", "selector"])
        .as_mapping()
        .expect("the Service's selector is a map of labels");
    assert!(
        !selector.is_empty()
            && selector
                .iter()
                .all(|(k, v)| k.as_str().is_some_and(|k| label(&labels, k) == v.as_str())),
        "the Service `toolgate` selects the toolgate pods"
    );
    let ports = seq(service, &["spec", "ports"]);
    assert!(!ports.is_empty(), "the Service `toolgate` has a port");
    for port in ports {
        let number = lookup(port, &["port"]).and_then(YamlOwned::as_integer);
        let target = lookup(port, &["targetPort"]).map_or(number, |t| port_number(toolgate, t));
        assert_eq!(
            number,
            Some(DATA_PORT),
            "the Service `toolgate` exposes port {DATA_PORT} only"
        );
        assert_eq!(
            target,
            Some(DATA_PORT),
            "the Service `toolgate` sends to the data port {DATA_PORT} only, never the admin port {ADMIN_PORT}"
        );
    }
}

#[test]
fn pod_disruption_budget_selects_the_toolgate_pods() {
    let objects = render();
    let deployment = deployment(&objects);
    let labels = pod_labels(deployment);
    let budgets = of_kind(&objects, "PodDisruptionBudget");
    let budget = budgets
        .iter()
        .find(|b| {
            lookup(b, &["spec", "selector", "matchLabels"]).is_some() && selects(at(b, &["spec", "selector"]), &labels)
        })
        .expect("a PodDisruptionBudget selects the toolgate pods by their labels");
    let min = lookup(budget, &["spec", "minAvailable"]);
    let max = lookup(budget, &["spec", "maxUnavailable"]);
    assert!(
        min.is_some() != max.is_some(),
        "the PodDisruptionBudget sets one of minAvailable and maxUnavailable"
    );
    // With two replicas, a budget must let a drain take one pod and keep the other.
    let replicas = lookup(deployment, &["spec", "replicas"]).and_then(YamlOwned::as_integer);
    if let (Some(replicas), Some(n)) = (replicas, min.or(max).and_then(YamlOwned::as_integer)) {
        assert!(
            (1..replicas).contains(&n),
            "the PodDisruptionBudget allows a drain and keeps a replica: {n} of {replicas}"
        );
    }
}

/// Whether a NetworkPolicy ingress rule admits traffic to `port` of the container (a rule with
/// no `ports`, or a port entry with no `port`, admits every port).
fn rule_admits_port(rule: &YamlOwned, container: &YamlOwned, port: i64) -> bool {
    let ports = seq(rule, &["ports"]);
    ports.is_empty()
        || ports.iter().any(|p| match lookup(p, &["port"]) {
            None => true,
            Some(first) => {
                let first = port_number(container, first);
                let last = lookup(p, &["endPort"]).and_then(YamlOwned::as_integer).or(first);
                first
                    .zip(last)
                    .is_some_and(|(first, last)| (first..=last).contains(&port))
            }
        })
}

/// Whether a NetworkPolicy ingress rule admits a pod with `labels`, in any namespace: the test
/// does not know the agents' namespaces, so a peer with no `podSelector` (whole namespaces, or
/// an `ipBlock`) admits it, and so does a rule with no `from`.
fn rule_admits_pods(rule: &YamlOwned, labels: &[(&str, &str)]) -> bool {
    let peers = seq(rule, &["from"]);
    peers.is_empty()
        || peers
            .iter()
            .any(|peer| lookup(peer, &["podSelector"]).is_none_or(|s| selects(s, labels)))
}

#[test]
fn network_policy_admits_agents_to_the_data_port_and_keeps_them_off_the_admin_port() {
    let objects = render();
    let deployment = deployment(&objects);
    let labels = pod_labels(deployment);
    let toolgate = serving_container(pod_spec(deployment));

    let policies: Vec<&YamlOwned> = of_kind(&objects, "NetworkPolicy")
        .into_iter()
        .filter(|p| selects(at(p, &["spec", "podSelector"]), &labels))
        .collect();
    assert!(!policies.is_empty(), "a NetworkPolicy selects the toolgate pods");
    for policy in &policies {
        let types = strings(policy, &["spec", "policyTypes"]);
        assert!(
            types.is_empty() || types.contains(&"Ingress"),
            "the NetworkPolicy restricts ingress (policyTypes has Ingress): {types:?}"
        );
    }
    let rules: Vec<&YamlOwned> = policies.iter().flat_map(|p| seq(p, &["spec", "ingress"])).collect();

    assert!(
        rules
            .iter()
            .any(|r| rule_admits_port(r, toolgate, DATA_PORT) && rule_admits_pods(r, AGENT)),
        "a NetworkPolicy rule admits the agents (toolgate.io/role: agent) to the data port {DATA_PORT}"
    );
    for rule in rules.iter().filter(|r| rule_admits_port(r, toolgate, ADMIN_PORT)) {
        assert!(
            !rule_admits_pods(rule, AGENT),
            "no NetworkPolicy rule for the admin port {ADMIN_PORT} admits the agents (toolgate.io/role: agent)"
        );
    }
    assert!(
        rules
            .iter()
            .any(|r| rule_admits_port(r, toolgate, ADMIN_PORT) && rule_admits_pods(r, OPERATOR)),
        "a NetworkPolicy rule admits the operators (toolgate.io/role: operator) to the admin port {ADMIN_PORT}"
    );
}

#[test]
fn the_bases_policies_are_the_bundled_ones() {
    // kustomize reads files only under its own directory, so the base carries a copy of
    // `policies/`: it must not drift from what the demo, the tests and the image ship.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let copy = root.join("deploy/kubernetes/policies");
    let mut names: Vec<_> = std::fs::read_dir(root.join("policies"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    assert!(!names.is_empty());
    for original in names {
        let name = original.file_name().unwrap();
        let copied = std::fs::read(copy.join(name))
            .unwrap_or_else(|e| panic!("deploy/kubernetes/policies/{} is missing: {e}", name.to_string_lossy()));
        assert!(
            copied == std::fs::read(&original).unwrap(),
            "deploy/kubernetes/policies/{} differs from policies/: copy it again",
            name.to_string_lossy()
        );
    }
}
