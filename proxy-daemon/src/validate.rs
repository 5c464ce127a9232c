//! `proxy-daemon validate PATH...`: one `PATH:LINE: KIND/NAMESPACE/NAME: message` per
//! problem, exit 1 if any.
use std::{path::PathBuf, process::ExitCode};

use crate::{
    config::{local, ConfigError},
    state::{self, CaptureSettings},
};
use proxy_common::FailMode;

/// Every problem in `paths`, in file order.
pub fn problems(paths: &[PathBuf]) -> Vec<ConfigError> {
    let mut out = Vec::new();
    for path in paths {
        let loaded = local::load_path(path);
        out.extend(loaded.errors);
        for (origin, object) in loaded.other_kinds {
            out.push(ConfigError {
                path: origin.path,
                line: origin.line,
                message: format!("kind {} is not supported by this build", object.kind),
                object: Some(object),
            });
        }
        let settings = CaptureSettings {
            label_key: state::CAPTURE_LABEL_KEY.into(),
            label_value: "enabled".into(),
            node_name: String::new(),
            default_fail_mode: FailMode::Open,
        };
        if let Err(errors) = state::compile(&loaded.objects, &settings, 0) {
            out.extend(errors);
        }
    }
    out.sort_by(|a, b| (&a.path, a.line).cmp(&(&b.path, b.line)));
    out
}

pub fn run(paths: &[PathBuf]) -> ExitCode {
    let problems = problems(paths);
    for p in &problems {
        println!("{p}");
    }
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
