//! The routing tests' node: `reviews` v1 and v2 as HTTP echo servers on their own hosts,
//! behind a Service (cluster IP [`CLUSTER_IP`], ports 80 and 8080 → 9080) with v1/v2
//! subsets, client pods in captured namespaces, the daemon started.
use std::time::Duration;

use crate::{
    daemon::Daemon,
    node::{endpoint_pod_yaml, namespace_yaml, pod_yaml, Node},
    servers::{HttpEcho, Servers},
    Pod,
};

pub const CLUSTER_IP: &str = "198.18.0.250";
pub const HOST: &str = "reviews.backend.svc.cluster.local";

/// What the app dials for the Service's port 80.
pub fn to() -> String {
    format!("{CLUSTER_IP}:80")
}

/// A VirtualService for [`HOST`]: requests with `x-canary: yes` to subset v2, the rest to v1.
pub fn canary_virtual_service() -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: backend}}
spec:
  hosts: [{HOST}]
  http:
  - match: [{{headers: {{x-canary: {{exact: 'yes'}}}}}}]
    route: [{{destination: {{host: {HOST}, subset: v2}}}}]
  - route: [{{destination: {{host: {HOST}, subset: v1}}}}]
"
    )
}

/// How many of pdtool's answers came from `name`.
pub fn served(out: &serde_json::Value, name: &str) -> u64 {
    out["servers"][name].as_u64().unwrap_or(0)
}

pub struct Reviews {
    pub node: Node,
    pub servers: Servers,
    pub pods: Vec<Pod>,
    pub daemon: Daemon,
}

/// A client pod to make: namespace, name, labels.
struct PodSpec {
    namespace: String,
    name: String,
    labels: Vec<(String, String)>,
}

pub struct ReviewsBuilder {
    tag: String,
    v2: HttpEcho,
    extra: String,
    pods: Vec<PodSpec>,
    flags: Vec<String>,
}

impl Reviews {
    pub fn builder(tag: &str) -> ReviewsBuilder {
        ReviewsBuilder {
            tag: tag.into(),
            v2: HttpEcho {
                name: "reviews-v2".into(),
                ..Default::default()
            },
            extra: String::new(),
            pods: Vec::new(),
            flags: Vec::new(),
        }
    }
}

impl ReviewsBuilder {
    pub fn v2(mut self, v2: HttpEcho) -> Self {
        self.v2 = v2;
        self
    }

    /// More YAML (rules) for the configuration.
    pub fn yaml(mut self, extra: &str) -> Self {
        self.extra.push_str(extra);
        if !self.extra.trim_end().ends_with("---") {
            self.extra.push_str("\n---\n");
        }
        self
    }

    /// A client pod in captured namespace `namespace`.
    pub fn pod(mut self, namespace: &str, name: &str, labels: &[(&str, &str)]) -> Self {
        self.pods.push(PodSpec {
            namespace: namespace.into(),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        });
        self
    }

    pub fn flags(mut self, flags: &[&str]) -> Self {
        self.flags.extend(flags.iter().map(|f| f.to_string()));
        self
    }

    pub fn start(self) -> Reviews {
        let mut node = Node::new(&self.tag);
        let servers = Servers::new();
        let b1 = node.host("reviews-v1");
        let b2 = node.host("reviews-v2");
        servers.http_echo(
            &b1,
            9080,
            HttpEcho {
                name: "reviews-v1".into(),
                ..Default::default()
            },
        );
        servers.http_echo(&b2, 9080, self.v2);
        let mut namespaces: Vec<&str> = self.pods.iter().map(|p| p.namespace.as_str()).collect();
        namespaces.sort();
        namespaces.dedup();
        let mut yaml = namespace_yaml("backend", false, None);
        for ns in namespaces {
            yaml += &namespace_yaml(ns, true, None);
        }
        yaml += &endpoint_pod_yaml(
            &b1,
            "reviews-v1-a",
            "backend",
            &[("app", "reviews"), ("version", "v1")],
        );
        yaml += &endpoint_pod_yaml(
            &b2,
            "reviews-v2-a",
            "backend",
            &[("app", "reviews"), ("version", "v2")],
        );
        yaml += &format!(
            "apiVersion: v1
kind: Service
metadata: {{name: reviews, namespace: backend}}
spec:
  clusterIP: {CLUSTER_IP}
  selector: {{app: reviews}}
  ports:
  - {{name: http, port: 80, targetPort: 9080}}
  - {{name: http-alt, port: 8080, targetPort: 9080}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: backend}}
spec:
  host: {HOST}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
"
        );
        yaml += &self.extra;
        let mut pods = Vec::new();
        for spec in &self.pods {
            let p = node.pod(&spec.namespace, &spec.name);
            let labels: Vec<(&str, &str)> = spec
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            yaml.push_str(&pod_yaml(&p, &labels));
            pods.push(p);
        }
        node.write_config("all.yaml", &yaml);
        let flags: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        let daemon = Daemon::start(&node, &flags);
        for p in &pods {
            daemon.wait_enrolled(&p.uid, Duration::from_secs(5));
        }
        Reviews {
            node,
            servers,
            pods,
            daemon,
        }
    }
}
