//! `toolgate schema`: the JSON Schema of the config and policy files, derived from the types
//! that parse them. The published copies (docs/schema/) are what the binary prints; every
//! bundled config and policy file validates; the broken fixtures do not.

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
            "docs/schema/{which}.schema.json is stale: run `toolgate schema {which} > docs/schema/{which}.schema.json`"
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
