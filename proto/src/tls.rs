//! The server key and the pinned TLS channel to the control server.
//!
//! The control server has one key (the key of its TLS certificate, made by
//! the server itself on first start or taken from a certificate of a real
//! CA). A node pins it by its fingerprint, the SHA-256 of its
//! SubjectPublicKeyInfo ([`KeyPin`]), which every join token carries: the
//! TLS handshake succeeds only with a server that holds the pinned key, and
//! every map update is signed by it ([`verify`]). A rotation of the key is
//! signed by the key it replaces ([`ServerTrust::accept`] follows such
//! steps), so nodes that pinned the old key follow without new tokens.
//!
//! One crypto provider for all of it: aws-lc, the one QUIC (libp2p-tls)
//! already uses.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, SubjectPublicKeyInfoDer, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::api::{KeyRotation, ServerIdentity, ServerSignature};
use crate::signing;

/// The ALPN protocol of gRPC over TLS.
pub const ALPN_H2: &[u8] = b"h2";

/// The process's one crypto provider (aws-lc).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// A server key's fingerprint: SHA-256 of its SubjectPublicKeyInfo (DER).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyPin(pub [u8; 32]);

impl KeyPin {
    pub fn of_spki(spki: &[u8]) -> Self {
        Self(Sha256::digest(spki).into())
    }

    /// The pin of a certificate's key.
    pub fn of_cert(cert: &CertificateDer<'_>) -> Result<Self, rustls::Error> {
        Ok(Self::of_spki(&spki_of_cert(cert)?))
    }

    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        Some(Self(b.try_into().ok()?))
    }
}

impl fmt::Display for KeyPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyPin({self})")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a server key fingerprint is 64 hex digits (SHA-256), not {0:?}")]
pub struct BadPin(pub String);

impl FromStr for KeyPin {
    type Err = BadPin;
    fn from_str(s: &str) -> Result<Self, BadPin> {
        let s = s.strip_prefix("sha256:").unwrap_or(s);
        let bytes = hex::decode(s).map_err(|_| BadPin(s.to_string()))?;
        Self::from_bytes(&bytes).ok_or_else(|| BadPin(s.to_string()))
    }
}

/// The SubjectPublicKeyInfo (DER) of a certificate's key.
pub fn spki_of_cert(cert: &CertificateDer<'_>) -> Result<Vec<u8>, rustls::Error> {
    let parsed = rustls::server::ParsedCertificate::try_from(cert)?;
    Ok(parsed.subject_public_key_info().as_ref().to_vec())
}

/// Why a server signature does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the update carries no signature")]
    Missing,
    #[error("signed by key {signer}, not by the server key {expected}")]
    WrongKey { signer: String, expected: KeyPin },
    #[error("unsupported signature scheme {0:#06x}")]
    Scheme(u32),
    #[error("the signature does not verify: {0}")]
    Invalid(String),
}

/// Checks `sig` over `msg` against the key `spki` (DER).
pub fn verify(
    spki: &[u8],
    sig: Option<&ServerSignature>,
    msg: &[u8],
) -> Result<(), SignatureError> {
    let sig = sig.ok_or(SignatureError::Missing)?;
    let expected = KeyPin::of_spki(spki);
    if sig.key_pin.as_slice() != expected.0 {
        return Err(SignatureError::WrongKey {
            signer: hex::encode(&sig.key_pin),
            expected,
        });
    }
    let scheme = u16::try_from(sig.scheme)
        .map(SignatureScheme::from)
        .map_err(|_| SignatureError::Scheme(sig.scheme))?;
    // The schemes a TLS 1.3 server key signs with (one algorithm each).
    const TLS13: &[SignatureScheme] = &[
        SignatureScheme::ECDSA_NISTP256_SHA256,
        SignatureScheme::ECDSA_NISTP384_SHA384,
        SignatureScheme::ECDSA_NISTP521_SHA512,
        SignatureScheme::ED25519,
        SignatureScheme::RSA_PSS_SHA256,
        SignatureScheme::RSA_PSS_SHA384,
        SignatureScheme::RSA_PSS_SHA512,
    ];
    if !TLS13.contains(&scheme) {
        return Err(SignatureError::Scheme(sig.scheme));
    }
    let provider = provider();
    let algs = provider
        .signature_verification_algorithms
        .mapping
        .iter()
        .find(|(s, _)| *s == scheme)
        .map(|(_, algs)| *algs)
        .ok_or(SignatureError::Scheme(sig.scheme))?;
    let spki = SubjectPublicKeyInfoDer::from(spki);
    let key = webpki::RawPublicKeyEntity::try_from(&spki)
        .map_err(|e| SignatureError::Invalid(format!("server key: {e}")))?;
    let alg = *algs.first().ok_or(SignatureError::Scheme(sig.scheme))?;
    key.verify_signature(alg, msg, &sig.signature)
        .map_err(|e| SignatureError::Invalid(e.to_string()))
}

/// Why a server identity is not the one a node trusts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    #[error("the server presented no key")]
    NoKey,
    #[error(
        "the server's key {presented} is not the pinned key {pinned} (nor a signed rotation of it): \
         refusing this server; if its key really changed, join again with a new token"
    )]
    Mismatch { pinned: KeyPin, presented: KeyPin },
    #[error("key rotation {step} is not signed by the key it replaces: {source}")]
    BadRotation { step: usize, source: SignatureError },
}

#[derive(Default)]
struct TrustState {
    pin: Option<KeyPin>,
    /// The last key a TLS handshake presented that was not the pinned one.
    mismatch: Option<KeyPin>,
}

/// Which server key a client trusts: the pin from its join token, moved
/// along signed rotations. Shared by the TLS verifier and the code that
/// checks signed answers and maps; cheap to clone.
#[derive(Clone, Default)]
pub struct ServerTrust {
    state: Arc<Mutex<TrustState>>,
}

impl fmt::Debug for ServerTrust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTrust")
            .field("pin", &self.pin())
            .finish()
    }
}

impl ServerTrust {
    /// Trusts the key with fingerprint `pin`; `None`: nothing yet (plaintext
    /// on loopback trusts the first key it sees).
    pub fn new(pin: Option<KeyPin>) -> Self {
        Self {
            state: Arc::new(Mutex::new(TrustState {
                pin,
                mismatch: None,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TrustState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn pin(&self) -> Option<KeyPin> {
        self.lock().pin
    }

    /// The key a refused TLS handshake presented, if one was refused since
    /// the last call.
    pub fn take_mismatch(&self) -> Option<KeyPin> {
        self.lock().mismatch.take()
    }

    /// Checks the server's `identity` (from a join or authenticate answer, a
    /// full map, or [`crate::api::node_control_client`]'s GetServerIdentity)
    /// and moves the pin along its signed rotations. With no pin yet, the
    /// key is trusted from now on. Returns the trusted key (DER) and whether
    /// the pin moved.
    pub fn accept(
        &self,
        server_id: &str,
        identity: Option<&ServerIdentity>,
    ) -> Result<(Vec<u8>, bool), TrustError> {
        let identity = identity
            .filter(|i| !i.key.is_empty())
            .ok_or(TrustError::NoKey)?;
        let presented = KeyPin::of_spki(&identity.key);
        let mut st = self.lock();
        let Some(pinned) = st.pin else {
            st.pin = Some(presented);
            return Ok((identity.key.clone(), true));
        };
        if pinned == presented {
            return Ok((identity.key.clone(), false));
        }
        let moved = follow_rotations(server_id, pinned, &identity.rotations)?;
        if moved != Some(presented) {
            return Err(TrustError::Mismatch { pinned, presented });
        }
        tracing::info!(old = %pinned, new = %presented, "the control server's key was rotated; following the signed rotation");
        st.pin = Some(presented);
        st.mismatch = None;
        Ok((identity.key.clone(), true))
    }
}

/// Follows the signed rotations from `pinned`: the key they end at, or
/// `None` when none starts at `pinned`.
fn follow_rotations(
    server_id: &str,
    pinned: KeyPin,
    rotations: &[KeyRotation],
) -> Result<Option<KeyPin>, TrustError> {
    let Some(start) = rotations
        .iter()
        .position(|r| KeyPin::of_spki(&r.old_key) == pinned)
    else {
        return Ok(None);
    };
    let mut current = rotations[start].old_key.clone();
    for (step, r) in rotations.iter().enumerate().skip(start) {
        if r.old_key != current {
            return Err(TrustError::BadRotation {
                step,
                source: SignatureError::Invalid("the rotations do not form a chain".into()),
            });
        }
        let payload = signing::rotation_payload(server_id, &r.new_key, r.at_ms);
        verify(&r.old_key, r.signature.as_ref(), &payload)
            .map_err(|source| TrustError::BadRotation { step, source })?;
        current = r.new_key.clone();
    }
    Ok(Some(KeyPin::of_spki(&current)))
}

/// What a [`KeyVerifier`] accepts.
#[derive(Debug)]
enum KeyPolicy {
    /// Exactly the server certificates whose key is pinned in the trust.
    Pinned(ServerTrust),
    /// Any certificate, remembering which key it was: for fetching the
    /// (self-authenticating) server identity after a rotation, never for
    /// sending a secret.
    Observe(Mutex<Option<KeyPin>>),
}

/// Checks the server's certificate key by [`KeyPolicy`]; either way the
/// handshake's signature proves that the server holds that key.
#[derive(Debug)]
pub struct KeyVerifier {
    policy: KeyPolicy,
    provider: Arc<CryptoProvider>,
}

impl KeyVerifier {
    /// Accepts exactly the keys pinned in `trust`.
    pub fn pinned(trust: ServerTrust) -> Self {
        Self {
            policy: KeyPolicy::Pinned(trust),
            provider: provider(),
        }
    }

    /// Accepts any key the server proves to hold; [`Self::seen`] tells which.
    pub fn observing() -> Self {
        Self {
            policy: KeyPolicy::Observe(Mutex::new(None)),
            provider: provider(),
        }
    }

    /// The key an observing verifier last accepted.
    pub fn seen(&self) -> Option<KeyPin> {
        match &self.policy {
            KeyPolicy::Observe(seen) => *seen.lock().unwrap_or_else(|p| p.into_inner()),
            KeyPolicy::Pinned(_) => None,
        }
    }
}

impl ServerCertVerifier for KeyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = KeyPin::of_cert(end_entity)?;
        let trust = match &self.policy {
            KeyPolicy::Observe(seen) => {
                *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(presented);
                return Ok(ServerCertVerified::assertion());
            }
            KeyPolicy::Pinned(trust) => trust,
        };
        let mut st = trust.lock();
        match st.pin {
            Some(pin) if pin == presented => Ok(ServerCertVerified::assertion()),
            Some(pin) => {
                st.mismatch = Some(presented);
                Err(rustls::Error::General(format!(
                    "the server's key {presented} is not the pinned key {pin}"
                )))
            }
            None => Err(rustls::Error::General(
                "no pinned server key: https:// needs the key fingerprint of a join token".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS client configuration (HTTP/2) with `verifier`.
pub fn client_config(verifier: Arc<dyn ServerCertVerifier>) -> rustls::ClientConfig {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("aws-lc supports the default TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config
}

/// Checks the signature of a key rotation (for the server's own use when it
/// loads its rotations).
pub fn check_rotation(server_id: &str, r: &KeyRotation) -> Result<(), SignatureError> {
    verify(
        &r.old_key,
        r.signature.as_ref(),
        &signing::rotation_payload(server_id, &r.new_key, r.at_ms),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_print_and_parse() {
        let pin = KeyPin::of_spki(b"key");
        assert_eq!(pin.to_string().len(), 64);
        assert_eq!(pin.to_string().parse::<KeyPin>().unwrap(), pin);
        assert_eq!(
            format!("sha256:{pin}").parse::<KeyPin>().unwrap(),
            pin,
            "kubeadm's spelling too"
        );
        assert!("abc".parse::<KeyPin>().is_err());
        assert!("zz".repeat(32).parse::<KeyPin>().is_err());
    }

    #[test]
    fn first_key_is_trusted_only_without_a_pin() {
        let t = ServerTrust::new(None);
        let id = ServerIdentity {
            key: b"k1".to_vec(),
            ..Default::default()
        };
        assert!(t.accept("s", Some(&id)).unwrap().1);
        assert_eq!(t.pin(), Some(KeyPin::of_spki(b"k1")));
        let other = ServerIdentity {
            key: b"k2".to_vec(),
            ..Default::default()
        };
        assert!(matches!(
            t.accept("s", Some(&other)),
            Err(TrustError::Mismatch { .. })
        ));
        assert_eq!(t.accept("s", None), Err(TrustError::NoKey));
    }
}
