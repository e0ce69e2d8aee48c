//! The master key and the key slots that wrap it.
//!
//! A repository has one random 256-bit master key. Each key slot (`keys/<slot id>`) wraps it
//! with a key-encryption key derived from a passphrase by Argon2id, so passphrases can be
//! added, changed and revoked without touching data.

use argon2::{Algorithm, Argon2, Params, Version};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::object::{Header, ObjectKind, SealKey, HEADER_LEN};

const CHUNK_ID_CONTEXT: &str = "ferry 2026-11 chunk id v1";
const OBJECT_KEY_CONTEXT: &str = "ferry 2026-11 object encryption v1";
const DELTA_ID_CONTEXT: &str = "ferry 2026-11 delta id v1";
const INDEX_KEY_CONTEXT: &str = "ferry 2026-11 local index v1";

/// The repository master key and the keys derived from it.
#[derive(Clone)]
pub struct MasterKey {
    raw: [u8; 32],
    id_key: [u8; 32],
    delta_key: [u8; 32],
    seal: SealKey,
    index: SealKey,
}

/// Key material is wiped when the key is dropped (the AES key schedule inside the seal key is
/// the cipher crate's to manage).
impl Drop for MasterKey {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.raw.zeroize();
        self.id_key.zeroize();
        self.delta_key.zeroize();
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// A new random master key (32 bytes from the thread RNG), as `init` creates.
    pub fn generate() -> Self {
        let mut raw = [0u8; 32];
        rand::rng().fill_bytes(&mut raw);
        Self::from_raw(raw)
    }

    /// The master key `M` from its 32 raw bytes; derives `K_id` and `K_obj` with BLAKE3's
    /// `derive_key` (FORMAT.md §3).
    pub fn from_raw(raw: [u8; 32]) -> Self {
        let id_key = blake3::derive_key(CHUNK_ID_CONTEXT, &raw);
        let delta_key = blake3::derive_key(DELTA_ID_CONTEXT, &raw);
        let mut obj_key = zeroize::Zeroizing::new(blake3::derive_key(OBJECT_KEY_CONTEXT, &raw));
        let seal = SealKey::new(&obj_key);
        zeroize::Zeroize::zeroize(&mut *obj_key);
        let index_key = zeroize::Zeroizing::new(blake3::derive_key(INDEX_KEY_CONTEXT, &raw));
        MasterKey {
            raw,
            id_key,
            delta_key,
            seal,
            index: SealKey::new(&index_key),
        }
    }

    /// `K_id`, the key for chunk IDs (keyed BLAKE3), so IDs reveal nothing about content.
    pub fn id_key(&self) -> &[u8; 32] {
        &self.id_key
    }

    /// `K_delta`, the key for delta object IDs (FORMAT.md §14).
    pub fn delta_key(&self) -> &[u8; 32] {
        &self.delta_key
    }

    /// `K_obj`, the AES-256-GCM key sealing chunks and manifests.
    pub fn seal_key(&self) -> &SealKey {
        &self.seal
    }

    /// The AES-256-GCM key of the local index's entries (never used for an object in the
    /// bucket).
    pub fn index_key(&self) -> &SealKey {
        &self.index
    }
}

/// Argon2id parameters recorded in each key slot (the `kdf` object of FORMAT.md §3).
///
/// Accepted when deriving: `argon2id` version 19, `m_cost_kib` ≤ 4194304 (4 GiB),
/// `t_cost` ≤ 100, `p_cost` ≤ 64, and Argon2's own minimums; anything else is
/// [`Error::Kdf`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KdfParams {
    /// The KDF's name; only `"argon2id"` is supported.
    pub algorithm: String,
    /// The Argon2 version; only 19 (`0x13`) is supported.
    pub version: u32,
    /// Memory cost in KiB.
    pub m_cost_kib: u32,
    /// Time cost: number of passes.
    pub t_cost: u32,
    /// Parallelism: number of lanes.
    pub p_cost: u32,
}

impl KdfParams {
    /// The parameters `init`, `key add` and `key passwd` use: Argon2id v19, 19 MiB
    /// (19456 KiB), 2 passes, 1 lane.
    pub fn argon2id_default() -> Self {
        KdfParams {
            algorithm: "argon2id".into(),
            version: 0x13,
            m_cost_kib: 19 * 1024,
            t_cost: 2,
            p_cost: 1,
        }
    }

    /// Cheap parameters for unit tests; never used by the binary.
    pub fn argon2id_fast() -> Self {
        KdfParams {
            m_cost_kib: 64,
            t_cost: 1,
            ..Self::argon2id_default()
        }
    }

    fn derive(&self, passphrase: &[u8], salt: &[u8]) -> Result<[u8; 32]> {
        if self.algorithm != "argon2id" || self.version != 0x13 {
            return Err(Error::Kdf {
                reason: format!("unsupported KDF {} version {:#x}", self.algorithm, self.version),
            });
        }
        // Refuse absurd parameters from a (possibly hostile) key slot before allocating.
        if self.m_cost_kib > 4 * 1024 * 1024 || self.t_cost > 100 || self.p_cost > 64 {
            return Err(Error::Kdf {
                reason: "KDF parameters out of range".into(),
            });
        }
        let params = Params::new(self.m_cost_kib, self.t_cost, self.p_cost, Some(32)).map_err(|e| Error::Kdf { reason: e.to_string() })?;
        let mut out = [0u8; 32];
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password_into(passphrase, salt, &mut out)
            .map_err(|e| Error::Kdf { reason: e.to_string() })?;
        Ok(out)
    }
}

/// The JSON body of a `keys/<id>` object (FORMAT.md §3): the master key wrapped under a
/// key-encryption key derived from one passphrase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeySlot {
    /// The slot ID: 16 hex digits (8 random bytes), also the object name's last segment and
    /// part of the wrap's associated data.
    pub id: String,
    /// When the slot was created (UTC); slots are tried in this order when opening.
    pub created: chrono::DateTime<chrono::Utc>,
    /// Free text naming the passphrase for humans.
    pub label: String,
    /// The KDF that turns the passphrase into the key-encryption key.
    pub kdf: KdfParams,
    /// The 16-byte KDF salt, standard base64 with padding.
    pub salt: String,
    /// 60 bytes, standard base64 with padding: `nonce[12] ‖ ciphertext[32] ‖ tag[16]`, the
    /// master key sealed with AES-256-GCM under the key-encryption key. The associated data
    /// is `"ferry key slot" ‖ 00 ‖ repository id ‖ 00 ‖ slot id` (`"ferry key slot v2"` for
    /// a slot with a `mac`), so the slot opens only in its own repository.
    pub nonce_and_wrapped: String,
    /// 64 hex digits: keyed BLAKE3, under a key derived from the master key, of every other
    /// field and the repository's `config` object as stored (FORMAT.md §3) — a label,
    /// parameter or config changed since is found once the slot opens. Absent in slots made
    /// before it existed (their label and the config are not authenticated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// What [`KeySlot::verify`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotAuthenticity {
    /// The slot's fields and the config are as they were sealed.
    Authentic,
    /// A slot without a MAC (made before ferry wrote them): nothing to check.
    Legacy,
}

impl KeySlot {
    fn aad(repository_id: &str, slot_id: &str, with_mac: bool) -> Vec<u8> {
        let v = if with_mac { " v2" } else { "" };
        format!("ferry key slot{v}\0{repository_id}\0{slot_id}").into_bytes()
    }

    /// The MAC of this slot's fields (all but `mac`) and `config` (the `config` object's
    /// bytes as stored).
    fn compute_mac(&self, master: &MasterKey, config: &[u8]) -> [u8; 32] {
        let key = blake3::derive_key("ferry 2026-11 key slot mac v2", &master.raw);
        let mut h = blake3::Hasher::new_keyed(&key);
        let created = self.created.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
        let kdf = format!(
            "{} {} {} {} {}",
            self.kdf.algorithm, self.kdf.version, self.kdf.m_cost_kib, self.kdf.t_cost, self.kdf.p_cost
        );
        let parts: [&[u8]; 8] = [
            b"ferry key slot v2",
            self.id.as_bytes(),
            created.as_bytes(),
            self.label.as_bytes(),
            kdf.as_bytes(),
            self.salt.as_bytes(),
            self.nonce_and_wrapped.as_bytes(),
            config,
        ];
        for part in parts {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
        *h.finalize().as_bytes()
    }

    /// Checks, with the master key it opened to, that the slot's fields and `config` (the
    /// `config` object as stored) are those it was sealed with. [`Error::SlotNotAuthentic`]
    /// when they are not; [`SlotAuthenticity::Legacy`] for a slot without a MAC.
    pub fn verify(&self, master: &MasterKey, config: &[u8]) -> Result<SlotAuthenticity> {
        let Some(mac) = &self.mac else {
            return Ok(SlotAuthenticity::Legacy);
        };
        let expected = self.compute_mac(master, config);
        let given = hex::decode(mac).ok().and_then(|g| <[u8; 32]>::try_from(g).ok());
        // blake3::Hash compares in constant time (the MAC is a secret-keyed value).
        let same = given.is_some_and(|g| blake3::Hash::from_bytes(g) == blake3::Hash::from_bytes(expected));
        if same {
            Ok(SlotAuthenticity::Authentic)
        } else {
            Err(Error::SlotNotAuthentic {
                path: format!("keys/{}", self.id),
            })
        }
    }

    /// Wraps `master` under `passphrase` in a new slot, authenticated together with
    /// `config` (the repository's `config` object as stored).
    pub fn create(
        master: &MasterKey,
        passphrase: &[u8],
        repository_id: &str,
        label: &str,
        kdf: KdfParams,
        config: &[u8],
    ) -> Result<KeySlot> {
        let mut id = [0u8; 8];
        rand::rng().fill_bytes(&mut id);
        let id = hex::encode(id);
        let mut salt = [0u8; 16];
        rand::rng().fill_bytes(&mut salt);
        let kek = SealKey::new(&zeroize::Zeroizing::new(kdf.derive(passphrase, &salt)?));
        let mut sealed = Vec::new();
        kek.seal_into(&mut sealed, &Self::aad(repository_id, &id, true), &master.raw)?;
        let mut slot = KeySlot {
            id,
            created: chrono::Utc::now(),
            label: label.to_string(),
            kdf,
            salt: B64.encode(salt),
            nonce_and_wrapped: B64.encode(sealed),
            mac: None,
        };
        slot.mac = Some(hex::encode(slot.compute_mac(master, config)));
        Ok(slot)
    }

    /// Unwraps the master key; `Ok(None)` when the wrap's tag does not verify: another
    /// passphrase, a slot of another repository, or a damaged slot. Errors:
    /// [`Error::BadObject`] for malformed base64 or wrapped key, [`Error::Kdf`] for
    /// unsupported or out-of-range KDF parameters.
    pub fn open(&self, passphrase: &[u8], repository_id: &str) -> Result<Option<MasterKey>> {
        let bad = |reason: &str| Error::BadObject {
            path: format!("keys/{}", self.id),
            reason: reason.to_string(),
        };
        let salt = B64.decode(&self.salt).map_err(|_| bad("salt is not base64"))?;
        let sealed = B64.decode(&self.nonce_and_wrapped).map_err(|_| bad("wrapped key is not base64"))?;
        let kek = SealKey::new(&zeroize::Zeroizing::new(self.kdf.derive(passphrase, &salt)?));
        match kek.open(&[], &Self::aad(repository_id, &self.id, self.mac.is_some()), sealed.clone(), "") {
            Ok(raw) => {
                let raw = zeroize::Zeroizing::new(raw);
                let bytes: [u8; 32] = raw.as_slice().try_into().map_err(|_| bad("wrapped key is not 32 bytes"))?;
                Ok(Some(MasterKey::from_raw(bytes)))
            }
            Err(Error::Integrity { .. }) if self.mac.is_none() => {
                // A slot made with a MAC whose MAC was removed opens under the v2 data:
                // tampering, not a wrong passphrase.
                match kek.open(&[], &Self::aad(repository_id, &self.id, true), sealed, "") {
                    Ok(_) => Err(Error::SlotNotAuthentic {
                        path: format!("keys/{}", self.id),
                    }),
                    Err(Error::Integrity { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            }
            Err(Error::Integrity { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The complete `keys/<id>` object: the key slot header (flags `00`) followed by the
    /// slot as pretty-printed JSON.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Header {
            kind: ObjectKind::KeySlot,
            flags: 0,
        }
        .encode()
        .to_vec();
        serde_json::to_writer_pretty(&mut out, self).map_err(|source| Error::Json {
            context: "encoding key slot".into(),
            source,
        })?;
        Ok(out)
    }

    /// Parses a `keys/<id>` object: checks the header as a key slot's (see
    /// [`Header::decode`]), then the JSON ([`Error::Json`] if it does not parse). `path` names
    /// the object in errors.
    pub fn decode(bytes: &[u8], path: &str) -> Result<KeySlot> {
        Header::decode(bytes, ObjectKind::KeySlot, path)?;
        serde_json::from_slice(&bytes[HEADER_LEN..]).map_err(|source| Error::Json {
            context: format!("parsing key slot {path}"),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_round_trip() {
        let master = MasterKey::generate();
        let slot = KeySlot::create(&master, b"secret", "repo1", "test", KdfParams::argon2id_fast(), b"config").unwrap();
        let decoded = KeySlot::decode(&slot.encode().unwrap(), "k").unwrap();
        let opened = decoded.open(b"secret", "repo1").unwrap().unwrap();
        assert_eq!(opened.id_key(), master.id_key());
        assert_eq!(decoded.verify(&opened, b"config").unwrap(), SlotAuthenticity::Authentic);
        assert!(decoded.open(b"wrong", "repo1").unwrap().is_none());
        // A slot copied into another repository does not open there.
        assert!(decoded.open(b"secret", "repo2").unwrap().is_none());
    }

    #[test]
    fn a_changed_label_parameter_or_config_is_found_and_a_stripped_mac_does_not_open() {
        let master = MasterKey::generate();
        let slot = KeySlot::create(&master, b"secret", "repo1", "ops", KdfParams::argon2id_fast(), b"config").unwrap();
        let tampered = |f: &dyn Fn(&mut KeySlot)| {
            let mut s = slot.clone();
            f(&mut s);
            s
        };
        let relabelled = tampered(&|s| s.label = "backup-admin".into());
        let key = relabelled
            .open(b"secret", "repo1")
            .unwrap()
            .expect("the wrap does not cover the label");
        assert!(matches!(relabelled.verify(&key, b"config"), Err(Error::SlotNotAuthentic { .. })));
        let redated = tampered(&|s| s.created += chrono::Duration::seconds(1));
        assert!(redated.verify(&key, b"config").is_err());
        assert!(slot.verify(&key, b"config2").is_err(), "another config");
        let garbage = tampered(&|s| s.mac = Some("zz".into()));
        assert!(garbage.verify(&key, b"config").is_err());
        // Without its MAC the slot is read as a legacy one: the wrap's associated data
        // differs, so it does not open unchecked — it is found to be tampered with.
        let stripped = tampered(&|s| s.mac = None);
        assert!(matches!(stripped.open(b"secret", "repo1"), Err(Error::SlotNotAuthentic { .. })));
        assert!(stripped.open(b"wrong", "repo1").unwrap().is_none());
    }
}
