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
    checked(paths).0
}

/// The problems in `paths` and how many objects they hold.
fn checked(paths: &[PathBuf]) -> (Vec<ConfigError>, usize) {
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
    (out, objects.len())
}

/// Prints each problem (standard output, one per line, for scripts) and, unless `quiet`,
/// a one-line summary on standard error; exit 1 if any problem is an error.
pub fn run(paths: &[PathBuf], quiet: bool) -> ExitCode {
    let (problems, objects) = checked(paths);
    for p in &problems {
        println!("{p}");
    }
    let count = |s: Severity| problems.iter().filter(|p| p.severity == s).count();
    let errors = count(Severity::Error);
    if !quiet {
        eprintln!(
            "{}",
            summary(
                objects,
                paths.len(),
                errors,
                count(Severity::Warning),
                count(Severity::Note)
            )
        );
    }
    if errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn summary(objects: usize, paths: usize, errors: usize, warnings: usize, notes: usize) -> String {
    let plural = |n: usize, one: &str| {
        if n == 1 {
            format!("{n} {one}")
        } else {
            format!("{n} {one}s")
        }
    };
    let verdict = if errors == 0 { "valid" } else { "rejected" };
    format!(
        "validate: {} in {}: {verdict} ({}, {}, {})",
        plural(objects, "object"),
        plural(paths, "path"),
        plural(errors, "error"),
        plural(warnings, "warning"),
        plural(notes, "note")
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_summary_counts_and_says_whether_the_configuration_is_taken() {
        assert_eq!(
            super::summary(3, 1, 0, 1, 2),
            "validate: 3 objects in 1 path: valid (0 errors, 1 warning, 2 notes)"
        );
        assert_eq!(
            super::summary(1, 2, 1, 0, 0),
            "validate: 1 object in 2 paths: rejected (1 error, 0 warnings, 0 notes)"
        );
    }
}
