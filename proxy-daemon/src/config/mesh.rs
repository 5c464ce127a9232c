//! Istio's mesh configuration: the `mesh` key of ConfigMap `istio-system/istio`, where
//! an Istio installation keeps node-wide proxy settings. The daemon reads the tracing part
//! of it, so the sampling rate and the collectors change with a reload, as they do for
//! sidecars: `defaultConfig.tracing.sampling` (and the older
//! `defaultConfig.tracing.zipkin.address`), `extensionProviders` of type `opentelemetry`
//! or `zipkin` named in `defaultProviders.tracing`, and `enableTracing`. Every other field
//! of the mesh config is Istio's business and is left alone.
use serde::Deserialize;

/// Where Istio keeps the mesh config.
pub const MESH_CONFIG_NAMESPACE: &str = "istio-system";
pub const MESH_CONFIG_NAME: &str = "istio";
pub const MESH_CONFIG_KEY: &str = "mesh";

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfig {
    #[serde(default)]
    pub enable_tracing: Option<bool>,
    #[serde(default)]
    pub default_config: Option<ProxyConfig>,
    #[serde(default)]
    pub extension_providers: Vec<ExtensionProvider>,
    #[serde(default)]
    pub default_providers: Option<DefaultProviders>,
    /// `exportTo` of VirtualServices that set none (Istio's default: `*`).
    #[serde(default)]
    pub default_virtual_service_export_to: Vec<String>,
    /// `exportTo` of DestinationRules that set none.
    #[serde(default)]
    pub default_destination_rule_export_to: Vec<String>,
    /// `exportTo` of Services and ServiceEntries that set none.
    #[serde(default)]
    pub default_service_export_to: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyConfig {
    #[serde(default)]
    pub tracing: Option<ProxyTracing>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyTracing {
    /// Percentage (0–100) of requests sampled.
    #[serde(default)]
    pub sampling: Option<f64>,
    #[serde(default)]
    pub zipkin: Option<LegacyZipkin>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct LegacyZipkin {
    /// `host:port` of a Zipkin collector.
    pub address: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionProvider {
    pub name: String,
    #[serde(default)]
    pub opentelemetry: Option<OpenTelemetryProvider>,
    #[serde(default)]
    pub zipkin: Option<ZipkinProvider>,
    /// An HTTP external authorizer (AuthorizationPolicy CUSTOM).
    #[serde(default)]
    pub envoy_ext_authz_http: Option<ExtAuthzHttp>,
    /// A gRPC external authorizer: not called by proxy-daemon (CUSTOM policies naming it
    /// deny what they match).
    #[serde(default)]
    pub envoy_ext_authz_grpc: Option<serde_json::Value>,
}

/// Istio's `envoyExtAuthzHttp` extension provider.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExtAuthzHttp {
    /// `host` or `namespace/host`: a Service host name, or an address.
    pub service: String,
    pub port: u32,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub fail_open: bool,
    #[serde(default)]
    pub status_on_error: Option<String>,
    #[serde(default)]
    pub include_request_headers_in_check: Vec<String>,
    /// Deprecated; used when `includeRequestHeadersInCheck` is empty.
    #[serde(default)]
    pub include_headers_in_check: Vec<String>,
    #[serde(default)]
    pub include_additional_headers_in_check: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub headers_to_upstream_on_allow: Vec<String>,
    #[serde(default)]
    pub headers_to_downstream_on_deny: Vec<String>,
    #[serde(default)]
    pub headers_to_downstream_on_allow: Vec<String>,
    #[serde(default)]
    pub include_request_body_in_check: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OpenTelemetryProvider {
    pub service: String,
    pub port: u16,
    /// Present: OTLP over HTTP (protobuf); absent: OTLP over gRPC (Istio's default).
    #[serde(default)]
    pub http: Option<OtlpHttp>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct OtlpHttp {
    #[serde(default)]
    pub path: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ZipkinProvider {
    pub service: String,
    pub port: u16,
    #[serde(default)]
    pub path: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct DefaultProviders {
    #[serde(default)]
    pub tracing: Vec<String>,
}

/// What the mesh config says about tracing, checked: None where it says nothing.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct MeshTracing {
    pub sampling: Option<f64>,
    /// Collector URLs (`http://…` OTLP/HTTP, `grpc://…`, or Zipkin), when the mesh config
    /// names providers.
    pub otlp: Vec<String>,
    pub zipkin: Vec<String>,
    /// The mesh config names its collectors (an empty list then means none).
    pub sets_collectors: bool,
    /// `enableTracing: false`: no spans at all.
    pub disabled: bool,
}

impl MeshConfig {
    /// The tracing part, or what is wrong with it.
    pub fn tracing(&self) -> Result<MeshTracing, String> {
        let mut out = MeshTracing {
            disabled: self.enable_tracing == Some(false),
            ..Default::default()
        };
        let tracing = self
            .default_config
            .as_ref()
            .and_then(|d| d.tracing.as_ref());
        if let Some(s) = tracing.and_then(|t| t.sampling) {
            if !(0.0..=100.0).contains(&s) {
                return Err(format!(
                    "defaultConfig.tracing.sampling {s}: must be a percentage from 0 to 100"
                ));
            }
            out.sampling = Some(s);
        }
        if let Some(z) = tracing.and_then(|t| t.zipkin.as_ref()) {
            out.zipkin
                .push(format!("http://{}/api/v2/spans", z.address));
            out.sets_collectors = true;
        }
        let named = self
            .default_providers
            .as_ref()
            .map(|d| d.tracing.as_slice())
            .unwrap_or_default();
        for name in named {
            let p = self
                .extension_providers
                .iter()
                .find(|p| &p.name == name)
                .ok_or_else(|| {
                    format!("defaultProviders.tracing names {name:?}, which is not among extensionProviders")
                })?;
            out.sets_collectors = true;
            match (&p.opentelemetry, &p.zipkin) {
                (Some(o), _) => out.otlp.push(match &o.http {
                    Some(h) => format!(
                        "http://{}:{}{}",
                        o.service,
                        o.port,
                        h.path.as_deref().unwrap_or("/v1/traces")
                    ),
                    None => format!("grpc://{}:{}", o.service, o.port),
                }),
                (None, Some(z)) => out.zipkin.push(format!(
                    "http://{}:{}{}",
                    z.service,
                    z.port,
                    z.path.as_deref().unwrap_or("/api/v2/spans")
                )),
                (None, None) => {
                    return Err(format!(
                        "extension provider {name:?} is used for tracing but is neither opentelemetry nor zipkin (the tracing providers proxy-daemon supports)"
                    ))
                }
            }
        }
        for url in &out.otlp {
            crate::spans::Collector::otlp(url).map_err(|e| format!("tracing provider: {e}"))?;
        }
        for url in &out.zipkin {
            crate::spans::Collector::zipkin(url).map_err(|e| format!("tracing provider: {e}"))?;
        }
        Ok(out)
    }
}

/// Parses the `mesh` text of the ConfigMap.
pub fn parse(text: &str) -> Result<MeshConfig, String> {
    serde_saphyr::from_str::<MeshConfig>(text).map_err(|e| format!("data.mesh: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_mesh_config_tracing() {
        let m = parse(
            "
accessLogFile: /dev/stdout
enableTracing: true
defaultConfig:
  discoveryAddress: istiod.istio-system.svc:15012
  tracing:
    sampling: 10
extensionProviders:
- name: otel
  opentelemetry:
    service: opentelemetry-collector.observability.svc.cluster.local
    port: 4317
- name: otel-http
  opentelemetry:
    service: otel.observability
    port: 4318
    http: {path: /v1/traces, timeout: 5s}
- name: zipkin
  zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}
- name: prom
  prometheus: {}
defaultProviders:
  tracing: [otel, zipkin]
  metrics: [prom]
",
        )
        .unwrap();
        let t = m.tracing().unwrap();
        assert_eq!(t.sampling, Some(10.0));
        assert_eq!(
            t.otlp,
            ["grpc://opentelemetry-collector.observability.svc.cluster.local:4317"]
        );
        assert_eq!(
            t.zipkin,
            ["http://zipkin.istio-system.svc.cluster.local:9411/api/v2/spans"]
        );
        assert!(t.sets_collectors && !t.disabled);
    }

    #[test]
    fn bad_tracing_settings_are_errors() {
        let unknown = parse("defaultProviders: {tracing: [nope]}").unwrap();
        assert!(unknown.tracing().unwrap_err().contains("\"nope\""));
        let range = parse("defaultConfig: {tracing: {sampling: 150}}").unwrap();
        assert!(range.tracing().unwrap_err().contains("150"));
        let legacy =
            parse("defaultConfig: {tracing: {zipkin: {address: 'zipkin.istio-system:9411'}}}")
                .unwrap()
                .tracing()
                .unwrap();
        assert_eq!(
            legacy.zipkin,
            ["http://zipkin.istio-system:9411/api/v2/spans"]
        );
        assert!(
            parse("enableTracing: false")
                .unwrap()
                .tracing()
                .unwrap()
                .disabled
        );
    }
}
