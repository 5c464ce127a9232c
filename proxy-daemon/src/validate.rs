//! `proxy-daemon validate PATH...`: one `PATH:LINE: KIND/NAMESPACE/NAME: message` per
//! problem, exit 1 if any.
use std::{path::PathBuf, process::ExitCode};

use crate::{
    config::{local, ConfigError, Severity},
    state::{self, CaptureSettings},
};
use proxy_common::FailMode;

/// Every problem in `paths`, in file order. The paths are one configuration, as
/// `kubectl apply -f a -f b` and `istioctl analyze a b` take them: a VirtualService in one
/// file may use the DestinationRule of the next.
pub fn problems(paths: &[PathBuf]) -> Vec<ConfigError> {
    let mut out = Vec::new();
    let mut objects = Vec::new();
    for path in paths {
        let loaded = local::load_path(path);
        out.extend(loaded.errors);
        for (origin, object) in loaded.other_kinds {
            out.push(ConfigError {
                path: origin.path,
                line: origin.line,
                message: format!("kind {} is not used by proxy-daemon; ignored", object.kind),
                object: Some(object),
                severity: Severity::Note,
            });
        }
        objects.extend(loaded.objects);
    }
    let settings = CaptureSettings {
        label_key: state::CAPTURE_LABEL_KEY.into(),
        label_value: "enabled".into(),
        node_name: String::new(),
        default_fail_mode: FailMode::Open,
        default_export_to: Vec::new(),
        trust_domain: "cluster.local".into(),
    };
    match state::compile(&objects, &settings, 0) {
        Err(errors) => out.extend(errors),
        // Warnings and notes do not fail it.
        Ok(snap) => out.extend(snap.diagnostics),
    }
    state::sort_findings(&mut out);
    out.dedup();
    out
}

pub fn run(paths: &[PathBuf]) -> ExitCode {
    let problems = problems(paths);
    for p in &problems {
        println!("{p}");
    }
    if !problems.iter().any(ConfigError::is_error) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
