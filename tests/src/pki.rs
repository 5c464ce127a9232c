//! A certificate authority made in the test (rcgen), so TLS is real end to end without any
//! key material checked in.
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

pub struct TestCa {
    pub cert_pem: String,
    /// The CA's own key (for a daemon's built-in CA: `--ca-key`).
    pub key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A leaf certificate and its key, PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("ca key");
        let cert = params.self_signed(&key).expect("ca cert");
        Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA of `cert_pem` and `key_pem` (written by [`TestCa::new`] earlier).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Self {
        let key = KeyPair::from_pem(key_pem).expect("ca key");
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .expect("ca cert");
        Self {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            issuer: Issuer::from_ca_cert_der(&der, key).expect("issuer"),
        }
    }

    /// A server certificate for `names` (DNS SANs); `expired` makes one that ended in 2020.
    pub fn server(&self, names: &[&str], expired: bool) -> Leaf {
        self.leaf(names, ExtendedKeyUsagePurpose::ServerAuth, expired)
    }

    /// A server certificate whose only SAN is the URI `uri` (a SPIFFE identity, as mesh
    /// workloads carry).
    pub fn server_uri(&self, uri: &str) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
        params
            .distinguished_name
            .push(DnType::CommonName, "workload");
        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(uri).expect("URI SAN"),
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A workload certificate as a mesh CA issues it: only the URI SAN `uri` (a SPIFFE
    /// identity), for client and server use.
    pub fn workload(&self, uri: &str) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(uri).expect("URI SAN"),
        )];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Signs a CSR as a mesh CA does: the CSR's own SANs, client and server use, valid for
    /// `ttl` from now (less a minute of clock slack). Err when the CSR does not parse or
    /// its signature is wrong.
    pub fn sign_csr(&self, csr_pem: &str, ttl: std::time::Duration) -> Result<String, String> {
        let mut csr =
            rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| e.to_string())?;
        let now = std::time::SystemTime::now();
        csr.params.not_before = (now - std::time::Duration::from_secs(60)).into();
        csr.params.not_after = (now + ttl).into();
        csr.params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        csr.signed_by(&self.issuer)
            .map(|c| c.pem())
            .map_err(|e| e.to_string())
    }

    /// The URI SANs a CSR asks for.
    pub fn csr_uris(csr_pem: &str) -> Vec<String> {
        rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map(|csr| {
                csr.params
                    .subject_alt_names
                    .iter()
                    .filter_map(|san| match san {
                        rcgen::SanType::URI(u) => Some(u.as_str().to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A client certificate (CN and SAN `name`).
    pub fn client(&self, name: &str) -> Leaf {
        self.leaf(&[name], ExtendedKeyUsagePurpose::ClientAuth, false)
    }

    fn leaf(&self, names: &[&str], usage: ExtendedKeyUsagePurpose, expired: bool) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("leaf params");
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or("leaf"));
        params.extended_key_usages = vec![usage];
        if expired {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        }
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// Writes `text` to `dir/name`, returning the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    std::fs::create_dir_all(dir).expect("pki dir");
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write pem");
    p
}
