//! TLS for https probes and the events webhook: one client configuration
//! per `tls_verify` choice, built once per process, and what a failed
//! handshake means to an operator.
use std::{
    io,
    sync::{Arc, LazyLock},
};

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms, ring},
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use tracing::warn;

use super::state::TlsFailure;

/// The probes speak HTTP/1.1 only; saying so lets a server that prefers h2
/// pick what we speak.
const ALPN: &[u8] = b"http/1.1";

static VERIFYING: LazyLock<Arc<ClientConfig>> = LazyLock::new(|| {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(system_roots())
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Arc::new(config)
});

static TRUSTING: LazyLock<Arc<ClientConfig>> = LazyLock::new(|| {
    let provider = provider();
    let verifier = AnyCertificate {
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Arc::new(config)
});

/// The configuration for `tls_verify`: the system's roots when `true`, any
/// certificate when `false`.
pub(crate) fn client_config(verify: bool) -> Arc<ClientConfig> {
    Arc::clone(if verify { &VERIFYING } else { &TRUSTING })
}

/// ring, explicitly: no process-wide default provider needs installing, and
/// another crate's choice cannot change ours.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// The certificates the system trusts. Unreadable ones are skipped with a
/// warning; with none at all, every verified probe fails as "certificate not
/// trusted", which the warning explains.
fn system_roots() -> RootCertStore {
    let found = rustls_native_certs::load_native_certs();
    for error in &found.errors {
        warn!(%error, "skipping unreadable system root certificates");
    }
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        warn!(
            ignored,
            "no system root certificates: https health checks with tls_verify fail"
        );
    }
    roots
}

/// What a failed handshake or TLS read means, when `error` comes from TLS.
pub(super) fn failure(error: &io::Error) -> Option<TlsFailure> {
    let error = error.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(match error {
        rustls::Error::InvalidCertificate(certificate) => match certificate {
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                TlsFailure::WrongName
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                TlsFailure::Expired
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                TlsFailure::NotYetValid
            }
            CertificateError::Revoked => TlsFailure::Revoked,
            _ => TlsFailure::NotTrusted,
        },
        _ => TlsFailure::Handshake,
    })
}

/// `tls_verify: false`: any certificate for any name. The handshake's
/// signatures are still checked, so the server holds the certificate's key.
#[derive(Debug)]
struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
