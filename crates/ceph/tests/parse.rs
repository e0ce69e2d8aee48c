//! Parsing of real `rbd` / mon output captured from a Ceph 16.2.15 (Pacific) cluster. No cluster
//! needed.

use ferry_ceph::{Health, ImageInfo, SnapInfo};

const INFO: &[u8] = include_bytes!("data/rbd-info.json");
const INFO_SNAP: &[u8] = include_bytes!("data/rbd-info-snap.json");
const INFO_CLONE: &[u8] = include_bytes!("data/rbd-info-clone.json");
const SNAP_LS: &[u8] = include_bytes!("data/rbd-snap-ls.json");
const SNAP_LS_ALL: &[u8] = include_bytes!("data/rbd-snap-ls-all.json");
const HEALTH_OK: &[u8] = include_bytes!("data/health-ok.json");
const HEALTH_WARN: &[u8] = include_bytes!("data/health-warn.json");

#[test]
fn rbd_info() {
    let i = ImageInfo::from_json(INFO).expect("parse rbd info");
    assert_eq!(i.name, "t1");
    assert_eq!(i.id, "37373a32618e");
    assert_eq!(i.size, 64 << 20);
    assert_eq!(i.object_size, 4 << 20);
    assert_eq!(i.order, 22);
    assert_eq!(i.objects, 16);
    assert_eq!(i.snapshot_count, 2);
    assert_eq!(i.format, 2);
    assert_eq!(i.block_name_prefix, "rbd_data.37373a32618e");
    assert_eq!(
        i.features,
        ["layering", "exclusive-lock", "object-map", "fast-diff", "deep-flatten"]
    );
    assert!(i.has_feature("fast-diff"));
    assert!(!i.has_feature("journaling"));
    assert!(i.parent.is_none());
    assert_eq!(i.create_timestamp.as_deref(), Some("Tue Nov 24 19:01:55 2026"));
}

#[test]
fn rbd_info_of_a_snapshot_and_a_clone() {
    let i = ImageInfo::from_json(INFO_SNAP).expect("parse rbd info of a snapshot");
    assert_eq!(i.name, "t1");
    let c = ImageInfo::from_json(INFO_CLONE).expect("parse rbd info of a clone");
    let p = c.parent.expect("clone has a parent");
    assert_eq!((p.pool.as_str(), p.image.as_str(), p.snapshot.as_str()), ("rbd", "t1", "s1"));
    assert_eq!(p.overlap, 64 << 20);
    assert!(!p.trash);
}

#[test]
fn rbd_info_fills_object_size_from_order() {
    let i = ImageInfo::from_json(br#"{"name":"old","size":1048576,"order":20,"features":[]}"#).expect("parse minimal rbd info");
    assert_eq!(i.object_size, 1 << 20);
    assert_eq!(i.id, "");
}

#[test]
fn rbd_info_roundtrips_through_serde() {
    let i = ImageInfo::from_json(INFO_CLONE).expect("parse");
    let j = serde_json::to_vec(&i).expect("serialize");
    assert_eq!(ImageInfo::from_json(&j).expect("reparse"), i);
}

#[test]
fn rbd_snap_ls() {
    let s = SnapInfo::list_from_json(SNAP_LS).expect("parse rbd snap ls");
    assert_eq!(s.len(), 2);
    assert_eq!(s[0].id, 4);
    assert_eq!(s[0].name, "s1");
    assert_eq!(s[0].size, 64 << 20);
    assert!(s[0].protected, "\"true\" string");
    assert!(!s[1].protected, "\"false\" string");
    assert_eq!(s[1].timestamp.as_deref(), Some("Tue Nov 24 19:01:57 2026"));
    // --all adds a namespace field; it is ignored
    assert_eq!(SnapInfo::list_from_json(SNAP_LS_ALL).expect("parse --all"), s);
    assert!(SnapInfo::list_from_json(b"[]").expect("empty").is_empty());
    // booleans proper are accepted too (and our own serialization uses them)
    let j = serde_json::to_vec(&s).expect("serialize");
    assert_eq!(SnapInfo::list_from_json(&j).expect("reparse"), s);
}

#[test]
fn rbd_snap_ls_rejects_nonsense() {
    assert!(SnapInfo::list_from_json(br#"[{"id":1,"name":"a","size":1,"protected":"maybe"}]"#).is_err());
    assert!(SnapInfo::list_from_json(b"rbd: error").is_err());
}

#[test]
fn health() {
    let ok = Health::from_json(HEALTH_OK).expect("parse");
    assert!(ok.is_ok());
    let warn = Health::from_json(HEALTH_WARN).expect("parse");
    assert_eq!(warn.status, "HEALTH_WARN");
    assert_eq!(warn.checks[0].severity, "HEALTH_WARN");
}
