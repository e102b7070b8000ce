//! A certificate authority made at test time, with server, peer and client certificates for
//! loopback addresses, written as PEM files into a temporary directory: nothing secret is
//! committed, and every run has fresh keys.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A CA whose certificate is in `<dir>/<name>-ca.pem`.
pub struct TestCa {
    cert: Certificate,
    key: KeyPair,
    /// The CA certificate's PEM file.
    pub cert_file: PathBuf,
    dir: PathBuf,
    name: String,
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_file: PathBuf,
    /// Its private key.
    pub key_file: PathBuf,
}

impl Issued {
    /// The certificate's PEM.
    pub fn cert_pem(&self) -> Vec<u8> {
        std::fs::read(&self.cert_file).expect("read certificate")
    }

    /// The key's PEM.
    pub fn key_pem(&self) -> Vec<u8> {
        std::fs::read(&self.key_file).expect("read key")
    }
}

impl TestCa {
    /// A new CA named `name`, writing its files into `dir`.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("CA certificate");
        let cert_file = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&cert_file, cert.pem()).expect("write CA certificate");
        TestCa {
            cert,
            key,
            cert_file,
            dir: dir.to_path_buf(),
            name: name.to_string(),
        }
    }

    /// The CA certificate's PEM.
    pub fn cert_pem(&self) -> Vec<u8> {
        std::fs::read(&self.cert_file).expect("read CA certificate")
    }

    /// A certificate with common name `cn`, good for `localhost` and `127.0.0.1`, as a
    /// server and as a client (etcd's members use one certificate both ways on peer links).
    pub fn issue(&self, cn: &str) -> Issued {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("certificate");
        let stem = format!("{}-{cn}", self.name);
        let cert_file = self.dir.join(format!("{stem}.pem"));
        let key_file = self.dir.join(format!("{stem}-key.pem"));
        std::fs::write(&cert_file, cert.pem()).expect("write certificate");
        std::fs::write(&key_file, key.serialize_pem()).expect("write key");
        Issued {
            cert_file,
            key_file,
        }
    }
}
