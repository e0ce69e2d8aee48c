//! Which images a selection names right now: names and globs over a pool's listing, cinder
//! volumes by UUID, nova instances' disks. Re-evaluated on every run, so new images are
//! picked up; an image named explicitly that does not exist is reported, not skipped quietly.

use std::collections::BTreeMap;

use ferry_engine::RbdImage;

use crate::config::{Selection, Selector};

/// An image name or a glob (`*` any run of characters, `?` one character).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    /// Checks a pattern (no `/` or `@`: it matches image names within a pool).
    pub fn parse(s: &str) -> Result<Pattern, String> {
        if s.is_empty() {
            return Err("an empty image name".into());
        }
        if s.contains('/') || s.contains('@') {
            return Err(format!("'{s}' is not an image name or glob (the pool is a key of its own)"));
        }
        Ok(Pattern(s.to_string()))
    }

    /// True for a glob, false for a plain name.
    pub fn is_glob(&self) -> bool {
        self.0.contains(['*', '?'])
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        glob(self.0.as_bytes(), name.as_bytes())
    }
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    // Iterative wildcard matching with one backtrack point (linear in practice).
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

/// One image a selection backs up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The selection's name.
    pub selection: String,
    /// The source cluster's name.
    pub cluster: String,
    /// The image.
    pub image: RbdImage,
    /// The volume its backups belong to.
    pub volume: String,
    /// Labels for its manifests (the selection's, plus `selection` and the OpenStack UUIDs).
    pub labels: BTreeMap<String, String>,
}

/// What a selection names right now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    /// The images to back up.
    pub targets: Vec<Target>,
    /// Problems: images named explicitly that do not exist, pools that cannot be listed.
    pub problems: Vec<String>,
}

/// Resolves `sel` with `list(pool)` giving the images of a pool.
pub fn resolve(sel: &Selection, list: &mut dyn FnMut(&str) -> Result<Vec<String>, String>) -> Resolved {
    let mut out = Resolved::default();
    let mut listings: BTreeMap<String, Option<Vec<String>>> = BTreeMap::new();
    let mut listing = |pool: &str, problems: &mut Vec<String>| -> Option<Vec<String>> {
        listings
            .entry(pool.to_string())
            .or_insert_with(|| match list(pool) {
                Ok(v) => Some(v),
                Err(e) => {
                    problems.push(format!("cannot list the images of pool '{pool}': {e}"));
                    None
                }
            })
            .clone()
    };
    let add = |out: &mut Resolved, pool: &str, image: &str, uuid: Option<(&str, &str)>| {
        let volume = sel
            .volume_template
            .replace("{pool}", pool)
            .replace("{image}", image)
            .replace("{uuid}", uuid.map(|u| u.1).unwrap_or(image));
        if let Some(other) = out.targets.iter().find(|t| t.volume == volume) {
            if other.image.pool != pool || other.image.image != image {
                out.problems.push(format!(
                    "images {} and {pool}/{image} both make volume '{volume}'; {pool}/{image} is left out (put {{image}} in the volume template)",
                    other.image
                ));
            }
            return;
        }
        let mut labels = sel.labels.clone();
        labels.insert("selection".into(), sel.name.clone());
        if let Some((kind, u)) = uuid {
            labels.insert(format!("openstack.{kind}"), u.to_string());
        }
        match ferry_repo::validate_volume_name(&volume) {
            Ok(()) => out.targets.push(Target {
                selection: sel.name.clone(),
                cluster: sel.cluster.clone(),
                image: RbdImage {
                    pool: pool.to_string(),
                    image: image.to_string(),
                },
                volume,
                labels,
            }),
            Err(e) => out.problems.push(format!("image {pool}/{image} makes no volume name: {e}")),
        }
    };
    for s in &sel.selectors {
        match s {
            Selector::Images { pool, patterns } => {
                let Some(images) = listing(pool, &mut out.problems) else { continue };
                for p in patterns {
                    let mut found = false;
                    for img in images.iter().filter(|i| p.matches(i)) {
                        found = true;
                        add(&mut out, pool, img, None);
                    }
                    if !found && !p.is_glob() {
                        out.problems.push(format!("image {pool}/{} does not exist", p.as_str()));
                    }
                }
            }
            Selector::Cinder { pool, template, uuids } => {
                let Some(images) = listing(pool, &mut out.problems) else { continue };
                for u in uuids {
                    let name = template.replace("{uuid}", u);
                    if images.contains(&name) {
                        add(&mut out, pool, &name, Some(("cinder_volume", u)));
                    } else {
                        out.problems.push(format!("cinder volume {u}: image {pool}/{name} does not exist"));
                    }
                }
            }
            Selector::Nova { pool, uuids } => {
                let Some(images) = listing(pool, &mut out.problems) else { continue };
                for u in uuids {
                    let prefix = format!("{u}_disk");
                    let mut found = false;
                    for img in images.iter().filter(|i| i.starts_with(&prefix)) {
                        found = true;
                        add(&mut out, pool, img, Some(("nova_instance", u)));
                    }
                    if !found {
                        out.problems.push(format!("nova instance {u}: no image {pool}/{prefix}* exists"));
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WorkerConfig;

    #[test]
    fn globs() {
        let m = |p: &str, s: &str| Pattern::parse(p).unwrap().matches(s);
        assert!(m("*", "anything"));
        assert!(m("db-*", "db-1"));
        assert!(!m("db-*", "web-1"));
        assert!(m("a?c", "abc"));
        assert!(!m("a?c", "abbc"));
        assert!(m("*-disk*", "vm-disk.config"));
        assert!(m("a*b*c", "a-b-b-c"));
        assert!(!m("a*b*c", "a-b-b-"));
        assert!(Pattern::parse("rbd/x").is_err());
    }

    #[test]
    fn selections_resolve_against_listings() {
        let c = WorkerConfig::parse(
            std::path::Path::new("w.toml"),
            r#"
[[selection]]
name = "s"
pool = "rbd"
images = ["db-*", "web", "gone"]
schedule = "@daily"
cinder_volumes = ["0b3c6f0e-4a38-4b4e-9a47-1f5e6c1b2a3d", "11111111-2222-3333-4444-555555555555"]
cinder_pool = "rbd"
nova_instances = ["5e6c1b2a-0b3c-4a38-9a47-1f5e6c1b2a3d"]
nova_pool = "rbd"
"#,
        )
        .unwrap();
        let images = vec![
            "db-1".to_string(),
            "db-2".into(),
            "web".into(),
            "other".into(),
            "volume-0b3c6f0e-4a38-4b4e-9a47-1f5e6c1b2a3d".into(),
            "5e6c1b2a-0b3c-4a38-9a47-1f5e6c1b2a3d_disk".into(),
            "5e6c1b2a-0b3c-4a38-9a47-1f5e6c1b2a3d_disk.config".into(),
        ];
        let r = resolve(&c.selections[0], &mut |pool| {
            assert_eq!(pool, "rbd");
            Ok(images.clone())
        });
        let vols: Vec<&str> = r.targets.iter().map(|t| t.volume.as_str()).collect();
        assert_eq!(
            vols,
            [
                "rbd.db-1",
                "rbd.db-2",
                "rbd.web",
                "rbd.volume-0b3c6f0e-4a38-4b4e-9a47-1f5e6c1b2a3d",
                "rbd.5e6c1b2a-0b3c-4a38-9a47-1f5e6c1b2a3d_disk",
                "rbd.5e6c1b2a-0b3c-4a38-9a47-1f5e6c1b2a3d_disk.config"
            ]
        );
        assert_eq!(
            r.targets[3].labels["openstack.cinder_volume"],
            "0b3c6f0e-4a38-4b4e-9a47-1f5e6c1b2a3d"
        );
        assert_eq!(r.targets[0].labels["selection"], "s");
        assert_eq!(r.problems.len(), 2, "{:?}", r.problems);
        assert!(r.problems[0].contains("rbd/gone does not exist"));
        assert!(r.problems[1].contains("11111111-2222-3333-4444-555555555555"));
    }
}
