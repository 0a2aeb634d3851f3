//! `--config FILE`: every command-line option as a TOML or YAML key (`worker-urls` or
//! `worker_urls`). The file's values become leading arguments and the real command line
//! follows, so the command line always wins.

use std::ffi::OsString;

use clap::CommandFactory;
use serde_json::Value;

use super::Args;

/// Reads `path` and turns it into command-line arguments, naming the key on any error.
pub fn args_from_file(path: &str) -> Result<Vec<OsString>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read config file {path}: {e}"))?;
    let value: Value = if path.ends_with(".yaml") || path.ends_with(".yml") {
        serde_yaml::from_str(&text).map_err(|e| format!("config file {path} is not valid YAML: {}", one_line(&e)))?
    } else {
        let t: toml::Value =
            toml::from_str(&text).map_err(|e| format!("config file {path} is not valid TOML: {}", one_line(&e)))?;
        serde_json::to_value(t).map_err(|e| format!("config file {path}: {e}"))?
    };
    let Value::Object(map) = value else {
        return Err(format!("config file {path} must be a table of option = value"));
    };
    let command = Args::command();
    let mut out = Vec::new();
    for (key, value) in map {
        let flag = key.replace('_', "-");
        let known = command.get_arguments().find(|a| a.get_long() == Some(flag.as_str()));
        let Some(arg) = known.filter(|_| flag != "config" && flag != "print-config") else {
            return Err(format!("config file {path}: unknown key '{key}'"));
        };
        let takes_value = arg.get_action().takes_values();
        let scalar = |v: &Value| -> Result<String, String> {
            match v {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) => Ok(n.to_string()),
                Value::Bool(b) => Ok(b.to_string()),
                _ => Err(format!("config file {path}: key '{key}' must be a string, number or boolean")),
            }
        };
        match (&value, takes_value) {
            (Value::Null, _) => {}
            (Value::Bool(true), false) => out.push(OsString::from(format!("--{flag}"))),
            (Value::Bool(false), false) => {}
            (_, false) => return Err(format!("config file {path}: key '{key}' must be true or false")),
            (Value::Array(items), true) => {
                out.push(OsString::from(format!("--{flag}")));
                for item in items {
                    out.push(OsString::from(scalar(item)?));
                }
            }
            (v, true) => {
                out.push(OsString::from(format!("--{flag}")));
                out.push(OsString::from(scalar(v)?));
            }
        }
    }
    Ok(out)
}

/// A parser's (multi-line, annotated) message on one line.
fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The `--config` value in `argv`, if any.
pub fn config_path(argv: &[OsString]) -> Option<String> {
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--config" {
            return it.next().map(|p| p.to_string_lossy().into_owned());
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(p.to_owned());
        }
    }
    None
}
