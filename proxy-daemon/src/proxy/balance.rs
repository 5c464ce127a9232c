//! Endpoint choice per DestinationRule: round robin, random, and consistent hashing with
//! Envoy's ring hash or Maglev. Rings are built once per (host, subset, snapshot
//! generation) and shared; hashes are FNV-1a so they are stable across restarts.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

/// FNV-1a, 64 bit, finished with murmur3's fmix64: deterministic (unlike std's hasher),
/// and the finalizer spreads the near-identical strings ring points are made of.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// A consistent-hash table over endpoints.
pub enum HashTable {
    /// Sorted (point, endpoint index).
    Ring(Vec<(u64, usize)>),
    /// Maglev lookup table of endpoint indexes.
    Maglev(Vec<usize>),
}

impl HashTable {
    pub fn ring(endpoints: &[SocketAddr], minimum_size: u64) -> Self {
        // Points per endpoint must not depend on how many endpoints there are: otherwise
        // removing one re-points every other and keys move between survivors.
        let per = (minimum_size as usize / 4).clamp(64, 1024);
        let mut points: Vec<(u64, usize)> = endpoints
            .iter()
            .enumerate()
            .flat_map(|(i, ep)| (0..per).map(move |r| (fnv1a(format!("{ep}_{r}").as_bytes()), i)))
            .collect();
        points.sort_unstable();
        HashTable::Ring(points)
    }

    /// Maglev (Eisenbud et al.): each endpoint fills the table by its own permutation.
    pub fn maglev(endpoints: &[SocketAddr], table_size: u64) -> Self {
        let m = table_size.max(endpoints.len() as u64 * 100).max(1) as usize;
        let n = endpoints.len();
        if n == 0 {
            return HashTable::Maglev(Vec::new());
        }
        let perms: Vec<(usize, usize)> = endpoints
            .iter()
            .map(|ep| {
                let name = ep.to_string();
                let offset = (fnv1a(name.as_bytes()) % m as u64) as usize;
                let skip =
                    (fnv1a(format!("{name}#skip").as_bytes()) % (m as u64 - 1).max(1)) as usize + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0usize; n];
        let mut table = vec![usize::MAX; m];
        let mut filled = 0;
        'fill: loop {
            for i in 0..n {
                let (offset, skip) = perms[i];
                let mut c = (offset + next[i] * skip) % m;
                // Bounded: each endpoint's permutation visits every slot within m steps.
                let mut tries = 0;
                while table[c] != usize::MAX && tries < m {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                    tries += 1;
                }
                table[c] = i;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        HashTable::Maglev(table)
    }

    pub fn pick(&self, hash: u64) -> Option<usize> {
        match self {
            HashTable::Ring(points) => {
                if points.is_empty() {
                    return None;
                }
                let i = points.partition_point(|(p, _)| *p < hash);
                Some(points[if i == points.len() { 0 } else { i }].1)
            }
            HashTable::Maglev(table) => {
                (!table.is_empty()).then(|| table[(hash % table.len() as u64) as usize])
            }
        }
    }
}

/// A table's key: host, subset, and the exact endpoint list it indexes.
type TableKey = (String, Option<String>, u64);

/// Tables of one snapshot generation.
type TablesOfGeneration = (u64, HashMap<TableKey, Arc<HashTable>>);

/// Tables kept per generation at most (each endpoint set an outlier ejection or a DNS
/// answer makes is one); beyond, the generation's tables are rebuilt as needed.
const MAX_TABLES: usize = 4096;

/// Shared tables. A table is built from, and only ever applied to, one endpoint list: the
/// key includes the list's fingerprint, so when an endpoint is ejected, becomes unready or
/// a DNS answer changes, the list changes and so does the table (only that endpoint's keys
/// move), and a table built while an endpoint was out never starves it once it is back.
#[derive(Default)]
pub struct Tables {
    inner: Mutex<TablesOfGeneration>,
}

/// The identity of an endpoint list, computed per hashed request: no formatting, no
/// allocation (the list's order matters, as the table indexes it).
fn fingerprint(endpoints: &[SocketAddr]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    endpoints.hash(&mut h);
    h.finish()
}

impl Tables {
    pub fn get(
        &self,
        generation: u64,
        host: &str,
        subset: Option<&str>,
        endpoints: &[SocketAddr],
        build: impl FnOnce() -> HashTable,
    ) -> Arc<HashTable> {
        let key = (
            host.to_string(),
            subset.map(str::to_string),
            fingerprint(endpoints),
        );
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.0 != generation || g.1.len() >= MAX_TABLES {
            *g = (generation, HashMap::new());
        }
        g.1.entry(key).or_insert_with(|| Arc::new(build())).clone()
    }
}

/// Round-robin counters, one per slot a host hashes to (cheap, no map per host).
pub struct RoundRobin([AtomicUsize; 64]);

impl Default for RoundRobin {
    fn default() -> Self {
        Self(std::array::from_fn(|_| AtomicUsize::new(0)))
    }
}

impl RoundRobin {
    pub fn next(&self, host: &str) -> usize {
        self.0[(fnv1a(host.as_bytes()) % 64) as usize].fetch_add(1, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 0, 0, i as u8 + 1], 80)))
            .collect()
    }

    fn moved_keys(
        table_a: &HashTable,
        a: &[SocketAddr],
        table_b: &HashTable,
        b: &[SocketAddr],
        removed: SocketAddr,
    ) -> (usize, usize) {
        let (mut moved, mut moved_wrongly) = (0, 0);
        for k in 0..5000u64 {
            let h = fnv1a(format!("user-{k}").as_bytes());
            let before = a[table_a.pick(h).unwrap()];
            let after = b[table_b.pick(h).unwrap()];
            if before != after {
                moved += 1;
                if before != removed {
                    moved_wrongly += 1;
                }
            }
        }
        (moved, moved_wrongly)
    }

    #[test]
    fn removing_an_endpoint_moves_only_its_keys() {
        let a = eps(4);
        let b: Vec<_> = a.iter().copied().filter(|e| *e != a[2]).collect();
        let (moved, wrong) = moved_keys(
            &HashTable::ring(&a, 1024),
            &a,
            &HashTable::ring(&b, 1024),
            &b,
            a[2],
        );
        assert!(
            moved > 900 && moved < 1600,
            "about a quarter moved: {moved}"
        );
        assert_eq!(wrong, 0, "ring hash: only the removed endpoint's keys move");
        let (moved, wrong) = moved_keys(
            &HashTable::maglev(&a, 65537),
            &a,
            &HashTable::maglev(&b, 65537),
            &b,
            a[2],
        );
        assert!(moved > 900 && moved < 1600, "{moved}");
        assert!(wrong < 250, "maglev moves few others: {wrong}");
    }

    #[test]
    fn keys_spread_over_all_endpoints() {
        let a = eps(3);
        for t in [HashTable::ring(&a, 1024), HashTable::maglev(&a, 65537)] {
            let mut counts = [0; 3];
            for k in 0..3000u64 {
                counts[t.pick(fnv1a(format!("k{k}").as_bytes())).unwrap()] += 1;
            }
            assert!(counts.iter().all(|c| *c > 600), "{counts:?}");
        }
    }
}

#[cfg(test)]
mod table_cache_tests {
    use super::*;

    #[test]
    fn a_table_is_never_applied_to_another_endpoint_list() {
        let eps: Vec<SocketAddr> = (1..=3)
            .map(|i| format!("10.0.0.{i}:80").parse().unwrap())
            .collect();
        let tables = Tables::default();
        let pick = |list: &[SocketAddr], key: u64| {
            let t = tables.get(1, "h", None, list, || HashTable::ring(list, 1024));
            list[t.pick(key).unwrap()]
        };
        let keys: Vec<u64> = (0..2000u64).map(|k| fnv1a(&k.to_le_bytes())).collect();
        let before: Vec<SocketAddr> = keys.iter().map(|k| pick(&eps, *k)).collect();
        // The second endpoint is ejected: only its keys move.
        let without: Vec<SocketAddr> = vec![eps[0], eps[2]];
        for (k, b) in keys.iter().zip(&before) {
            let now = pick(&without, *k);
            if *b != eps[1] {
                assert_eq!(now, *b, "a key of a healthy endpoint moved");
            }
        }
        // Back again, within the same generation: it gets its own keys back (a table built
        // while it was out is not reused for the full list).
        let after: Vec<SocketAddr> = keys.iter().map(|k| pick(&eps, *k)).collect();
        assert_eq!(before, after);
        assert!(
            after.contains(&eps[1]),
            "the returned endpoint is not starved"
        );
    }
}
