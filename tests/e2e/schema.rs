//! `toolgate schema`: the JSON Schema of the config and policy files. The published copies
//! (docs/schema/) are what the binary prints, and are what the types that parse the files
//! derive (`TOOLGATE_WRITE_SCHEMA=1 cargo test --test e2e schema` rewrites them); every bundled
//! config and policy file validates; the broken fixtures do not.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn printed(which: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_toolgate"))
        .args(["schema", which])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    toolgate::config::yaml::Document::parse(&path.display().to_string(), &text)
        .unwrap()
        .value
}

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn the_published_schemas_are_the_ones_the_binary_prints() {
    for which in ["config", "policy"] {
        let published = std::fs::read_to_string(root().join(format!("docs/schema/{which}.schema.json"))).unwrap();
        assert_eq!(
            published,
            printed(which),
            "`toolgate schema {which}` does not print docs/schema/{which}.schema.json"
        );
    }
}

/// What the binary prints is the file; the file must be what the parsing types derive, so a
/// field added to the config or a policy reaches the schema (or this fails).
#[test]
fn the_published_schemas_are_derived_from_the_types_that_parse_the_files() {
    for (which, derived) in [
        ("config", toolgate::config::config_schema()),
        ("policy", toolgate::policy::policy_schema()),
    ] {
        let path = root().join(format!("docs/schema/{which}.schema.json"));
        let derived = format!("{}\n", serde_json::to_string_pretty(&derived).unwrap());
        if std::env::var_os("TOOLGATE_WRITE_SCHEMA").is_some() {
            std::fs::write(&path, &derived).unwrap();
        }
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            derived,
            "docs/schema/{which}.schema.json is stale: run `cargo test` with TOOLGATE_WRITE_SCHEMA=1 to rewrite it"
        );
    }
}

#[test]
fn every_bundled_file_validates_and_the_broken_fixtures_do_not() {
    let policy = jsonschema::validator_for(&serde_json::from_str(&printed("policy")).unwrap()).unwrap();
    let config = jsonschema::validator_for(&serde_json::from_str(&printed("config")).unwrap()).unwrap();
    let mut policies = yaml_files("policies");
    policies.extend(yaml_files("docker/policies"));
    policies.extend(yaml_files("deploy/kubernetes/policies"));
    assert!(policies.len() >= 8, "{policies:?}");
    for p in &policies {
        let errors: Vec<String> = policy.iter_errors(&yaml(p)).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{}: {errors:?}", p.display());
    }
    for c in [
        "config/toolgate.yaml",
        "docker/toolgate.yaml",
        "docker/toolgate.redis.yaml",
    ] {
        let errors: Vec<String> = config
            .iter_errors(&yaml(&root().join(c)))
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{c}: {errors:?}");
    }

    // The broken fixtures: a misspelled key (`tols`), an HTTP method that does not exist.
    let a = yaml(&root().join("tests/fixtures/broken/policies/a.yaml"));
    let said: Vec<String> = policy.iter_errors(&a).map(|e| e.to_string()).collect();
    assert!(said.iter().any(|e| e.contains("tols")), "{said:?}");
    let b = yaml(&root().join("tests/fixtures/broken/policies/b.yaml"));
    let said: Vec<String> = policy.iter_errors(&b).map(|e| e.to_string()).collect();
    assert!(said.iter().any(|e| e.contains("FETCH")), "{said:?}");
    // A config with a key in the wrong place and a value of the wrong type.
    let broken: Value = serde_json::json!({"listen": 8080, "admin": {"tokn_env": "X"}});
    let said: Vec<String> = config.iter_errors(&broken).map(|e| e.to_string()).collect();
    assert!(said.iter().any(|e| e.contains("tokn_env")), "{said:?}");
    assert!(said.iter().any(|e| e.contains("8080")), "{said:?}");
}
