//! The approximate radix tree behind prefix-cache-aware routing.
//!
//! One multi-tenant tree for the whole fleet: each node records which workers ("tenants")
//! were sent a prompt through it, and when. A tenant present on a node is present on every
//! ancestor, so the match length of worker *w* is the depth of the deepest node on the
//! prompt's path that still lists *w*; one walk down the path gives every worker's match.
//! Match and insert cost O(prompt length) plus the tenants met on the (radix-compressed)
//! path, not O(length × workers).
//!
//! Keys are either UTF-8 text (stored as bytes, split only at character boundaries and
//! measured in characters) or token ids.
//!
//! **Bounded memory.** The tree's size is Σ over (node, tenant) of the node's label length,
//! the quantity sglang-router bounds per worker with `max_tree_size` — but there only by a
//! periodic background sweep, so it grows without bound between sweeps. Here every insert
//! evicts least-recently-used (node, tenant) pairs until the total is back under the bound;
//! only the prompt being inserted is never evicted, so the bound is exceeded by at most one
//! prompt. Recency is a logical tick (one per insert), never wall-clock time.
//! Eviction uses a lazy min-heap of (tick, deeper-first, node, tenant): a parent is touched
//! whenever a child is, so its tick is never older than its children's and leaves always
//! leave first.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A worker as the tree knows it (the worker's process-unique id).
pub type TenantId = u32;

/// One unit of a key: a byte of UTF-8 text, or a token id.
pub trait Unit: Copy + Eq + Hash + std::fmt::Debug + Send + Sync + 'static {
    /// Whether `s` may be split before position `i` (0 < i < len).
    fn boundary(s: &[Self], i: usize) -> bool;
    /// Size of `s` in counted units (characters for text).
    fn size(s: &[Self]) -> usize;
    /// The child key of a label starting at `s[0]`: the whole first character for text, so two
    /// characters sharing a lead byte never collide.
    fn head(s: &[Self]) -> u32;
}

impl Unit for u8 {
    fn boundary(s: &[u8], i: usize) -> bool {
        i >= s.len() || (s[i] & 0xC0) != 0x80
    }
    fn size(s: &[u8]) -> usize {
        s.iter().filter(|b| (**b & 0xC0) != 0x80).count()
    }
    fn head(s: &[u8]) -> u32 {
        let n = s.iter().skip(1).take(3).take_while(|b| (**b & 0xC0) == 0x80).count() + 1;
        s[..n].iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b))
    }
}

impl Unit for u32 {
    fn boundary(_: &[u32], _: usize) -> bool {
        true
    }
    fn size(s: &[u32]) -> usize {
        s.len()
    }
    fn head(s: &[u32]) -> u32 {
        s[0]
    }
}

/// FxHash: a fast non-cryptographic hash for small integer keys.
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// Children by head unit: a short vector while small, a hash map once wide (the root).
#[derive(Debug)]
enum Children {
    Few(Vec<(u32, u32)>),
    Many(FxMap<u32, u32>),
}

const FEW: usize = 12;

impl Children {
    fn get(&self, head: u32) -> Option<u32> {
        match self {
            Children::Few(v) => v.iter().find(|(h, _)| *h == head).map(|(_, n)| *n),
            Children::Many(m) => m.get(&head).copied(),
        }
    }
    fn set(&mut self, head: u32, node: u32) {
        match self {
            Children::Few(v) => {
                if let Some(e) = v.iter_mut().find(|(h, _)| *h == head) {
                    e.1 = node;
                } else if v.len() < FEW {
                    v.push((head, node));
                } else {
                    let mut m: FxMap<u32, u32> = v.drain(..).collect();
                    m.insert(head, node);
                    *self = Children::Many(m);
                }
            }
            Children::Many(m) => {
                m.insert(head, node);
            }
        }
    }
    fn remove(&mut self, head: u32) {
        match self {
            Children::Few(v) => v.retain(|(h, _)| *h != head),
            Children::Many(m) => {
                m.remove(&head);
            }
        }
    }
    fn is_empty(&self) -> bool {
        match self {
            Children::Few(v) => v.is_empty(),
            Children::Many(m) => m.is_empty(),
        }
    }
    fn for_each(&self, mut f: impl FnMut(u32)) {
        match self {
            Children::Few(v) => v.iter().for_each(|(_, n)| f(*n)),
            Children::Many(m) => m.values().for_each(|n| f(*n)),
        }
    }
    fn heap_bytes(&self) -> usize {
        match self {
            Children::Few(v) => v.capacity() * 8,
            Children::Many(m) => m.capacity() * 9,
        }
    }
}

#[derive(Debug)]
struct Node<U> {
    label: Box<[U]>,
    /// `U::size(label)`.
    size: u32,
    /// Size from the root to the end of this node.
    depth: u32,
    parent: u32,
    children: Children,
    /// (tenant, last-access tick), sorted by tenant.
    tenants: Vec<(TenantId, u64)>,
    alive: bool,
}

const ROOT: u32 = 0;

/// An eviction candidate: (last-access tick, deeper first, node, tenant), min-heap ordered.
type LruEntry = Reverse<(u64, Reverse<u32>, u32, TenantId)>;

/// Per-worker match lengths for one key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixMatch {
    /// (tenant, matched size), for every tenant with a non-empty match, sorted by tenant.
    pub tenants: Vec<(TenantId, usize)>,
    /// Size of the key.
    pub key_size: usize,
}

impl PrefixMatch {
    /// Matched size of `tenant` (0 when absent).
    pub fn of(&self, tenant: TenantId) -> usize {
        self.tenants.binary_search_by_key(&tenant, |e| e.0).map(|i| self.tenants[i].1).unwrap_or(0)
    }

    /// Matched size of each of `tenants`, in their order: one merge pass when they come sorted
    /// (the registry lists workers by id, so candidate lists usually do), a lookup each after
    /// the first one out of order.
    pub fn of_each(&self, tenants: impl IntoIterator<Item = TenantId>) -> Vec<usize> {
        let mut out = Vec::new();
        let (mut j, mut last) = (0usize, None);
        for t in tenants {
            if last.is_some_and(|l| t < l) || j > self.tenants.len() {
                j = usize::MAX; // out of order: look each remaining one up
            }
            last = Some(t);
            if j == usize::MAX {
                out.push(self.of(t));
                continue;
            }
            while j < self.tenants.len() && self.tenants[j].0 < t {
                j += 1;
            }
            out.push(if j < self.tenants.len() && self.tenants[j].0 == t { self.tenants[j].1 } else { 0 });
        }
        out
    }
}

/// The tree. Not synchronised: see [`SharedTree`].
#[derive(Debug)]
pub struct RadixTree<U: Unit> {
    nodes: Vec<Node<U>>,
    free: Vec<u32>,
    tick: u64,
    total: usize,
    per_tenant: FxMap<TenantId, usize>,
    pairs: usize,
    lru: BinaryHeap<LruEntry>,
    max_size: usize,
    /// Bound on [`RadixTree::live_bytes`].
    max_bytes: usize,
    /// Heap bytes owned by live nodes: labels, child maps, tenant lists.
    heap: usize,
}

/// Bytes of one node slot in the arena.
const NODE: usize = std::mem::size_of::<Node<u32>>();
/// Bytes of one LRU entry.
const ENTRY: usize = std::mem::size_of::<LruEntry>();
/// Bytes of one per-tenant size entry (key, value, control byte).
const TENANT_ENTRY: usize = 17;

fn common_prefix<U: Unit>(a: &[U], b: &[U]) -> usize {
    let mut n = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    while n > 0 && !U::boundary(a, n) {
        n -= 1;
    }
    n
}

impl<U: Unit> RadixTree<U> {
    /// An empty tree whose total size is kept at or under `max_size` (plus one prompt).
    pub fn new(max_size: usize) -> Self {
        Self::bounded(max_size, usize::MAX)
    }

    /// An empty tree kept at or under `max_size` stored units and `max_bytes` of memory (each
    /// plus one prompt).
    pub fn bounded(max_size: usize, max_bytes: usize) -> Self {
        let root = Node {
            label: Box::new([]),
            size: 0,
            depth: 0,
            parent: ROOT,
            children: Children::Few(Vec::new()),
            tenants: Vec::new(),
            alive: true,
        };
        Self {
            nodes: vec![root],
            free: Vec::new(),
            tick: 0,
            total: 0,
            per_tenant: FxMap::default(),
            pairs: 0,
            lru: BinaryHeap::new(),
            max_size,
            max_bytes,
            heap: 0,
        }
    }

    /// Heap bytes a node owns (its label, child map and tenant list).
    fn heap_of(n: &Node<U>) -> usize {
        n.label.len() * std::mem::size_of::<U>() + n.children.heap_bytes() + n.tenants.capacity() * 16
    }

    /// Runs `f` on node `i`, keeping the heap total right whatever `f` changes in it.
    fn edit<R>(&mut self, i: u32, f: impl FnOnce(&mut Node<U>) -> R) -> R {
        let n = &mut self.nodes[i as usize];
        let before = Self::heap_of(n);
        let out = f(n);
        let after = Self::heap_of(n);
        self.heap = self.heap - before + after;
        out
    }

    /// The memory the bound counts: live nodes with what they own, live LRU entries, and the
    /// per-tenant sizes. (Arena and heap slack, at most an eighth by the growth policy below,
    /// is in [`RadixTree::memory_bytes`] but not here, so eviction can always reach the bound.)
    pub fn live_bytes(&self) -> usize {
        self.heap + self.node_count() * NODE + self.lru.len() * ENTRY + self.per_tenant.len() * TENANT_ENTRY
    }

    /// The byte bound.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Sets the byte bound (the caller shares one budget between trees).
    pub fn set_max_bytes(&mut self, max_bytes: usize) {
        self.max_bytes = max_bytes;
    }

    /// Grows a vector by an eighth (at least `min`) when full, never doubling: its slack,
    /// which no eviction can give back, stays a small share of the bound.
    fn grow<T>(v: &mut Vec<T>, min: usize) {
        if v.len() == v.capacity() {
            v.reserve_exact((v.len() / 8).max(min));
        }
    }

    /// Σ over (node, tenant) of label sizes: what `max_size` bounds.
    pub fn total_size(&self) -> usize {
        self.total
    }

    /// Size held by one tenant.
    pub fn tenant_size(&self, tenant: TenantId) -> usize {
        self.per_tenant.get(&tenant).copied().unwrap_or(0)
    }

    /// Every tenant with something stored, and its size.
    pub fn tenant_sizes(&self) -> Vec<(TenantId, usize)> {
        self.per_tenant.iter().map(|(t, s)| (*t, *s)).collect()
    }

    /// The bound.
    pub fn max_size(&self) -> usize {
        self.max_size
    }

    /// Live nodes, root included.
    pub fn node_count(&self) -> usize {
        self.nodes.len() - self.free.len()
    }

    /// Heap memory in bytes: the arena (live and free slots), what live nodes own, the LRU
    /// heap and the per-tenant table — what the allocator holds for the tree.
    pub fn memory_bytes(&self) -> usize {
        self.nodes.capacity() * NODE
            + self.free.capacity() * 4
            + self.lru.capacity() * ENTRY
            + self.heap
            + self.per_tenant.capacity() * TENANT_ENTRY
    }

    /// Every tenant's match length for `key`.
    pub fn match_prefix(&self, key: &[U]) -> PrefixMatch {
        let mut out = PrefixMatch { tenants: Vec::new(), key_size: U::size(key) };
        let (mut cur, mut i) = (ROOT, 0usize);
        while i < key.len() {
            let Some(child) = self.nodes[cur as usize].children.get(U::head(&key[i..])) else {
                break;
            };
            let node = &self.nodes[child as usize];
            let cp = common_prefix(&node.label, &key[i..]);
            if cp == 0 {
                break;
            }
            let matched = if cp == node.label.len() {
                node.depth as usize
            } else {
                self.nodes[cur as usize].depth as usize + U::size(&node.label[..cp])
            };
            // Tenants here ⊆ tenants of the previous node. A node with few of them (the usual
            // deeper node) is looked up, not merged: a hot prefix held by a thousand workers
            // would otherwise cost a thousand steps at every node below it.
            if out.tenants.is_empty() {
                out.tenants.extend(node.tenants.iter().map(|(t, _)| (*t, matched)));
            } else if node.tenants.len() * 8 < out.tenants.len() {
                let mut from = 0;
                for (t, _) in &node.tenants {
                    if let Ok(j) = out.tenants[from..].binary_search_by_key(t, |e| e.0) {
                        out.tenants[from + j].1 = matched;
                        from += j + 1;
                    }
                }
            } else {
                let mut j = 0;
                for (t, _) in &node.tenants {
                    while j < out.tenants.len() && out.tenants[j].0 < *t {
                        j += 1;
                    }
                    if j < out.tenants.len() && out.tenants[j].0 == *t {
                        out.tenants[j].1 = matched;
                    }
                }
            }
            if cp < node.label.len() {
                break;
            }
            cur = child;
            i += cp;
        }
        out
    }

    /// Records that `key` was sent to `tenant`, then evicts down to the bound.
    pub fn insert(&mut self, key: &[U], tenant: TenantId) {
        self.tick += 1;
        let tick = self.tick;
        let (mut cur, mut i) = (ROOT, 0usize);
        while i < key.len() {
            let head = U::head(&key[i..]);
            let next = match self.nodes[cur as usize].children.get(head) {
                None => {
                    let leaf = self.alloc(&key[i..], cur);
                    self.edit(cur, |n| n.children.set(head, leaf));
                    i = key.len();
                    leaf
                }
                Some(child) => {
                    let cp = common_prefix(&self.nodes[child as usize].label, &key[i..]);
                    let node = if cp < self.nodes[child as usize].label.len() { self.split(child, cp) } else { child };
                    i += cp;
                    node
                }
            };
            self.touch(next, tenant, tick);
            cur = next;
        }
        if self.lru.len() > 2 * self.pairs + 4096 {
            self.rebuild_lru();
        }
        self.evict_to(self.max_size, tick);
    }

    fn alloc(&mut self, label: &[U], parent: u32) -> u32 {
        let size = U::size(label) as u32;
        let node = Node {
            label: label.into(),
            size,
            depth: self.nodes[parent as usize].depth + size,
            parent,
            children: Children::Few(Vec::new()),
            tenants: Vec::new(),
            alive: true,
        };
        self.heap += Self::heap_of(&node);
        match self.free.pop() {
            Some(slot) => {
                self.nodes[slot as usize] = node;
                slot
            }
            None => {
                Self::grow(&mut self.nodes, 64);
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        }
    }

    /// Splits `child`'s label at `at`; returns the new upper node (same tenants).
    fn split(&mut self, child: u32, at: usize) -> u32 {
        let parent = self.nodes[child as usize].parent;
        let (upper_label, lower_label): (Box<[U]>, Box<[U]>) = {
            let l = &self.nodes[child as usize].label;
            (l[..at].into(), l[at..].into())
        };
        let head = U::head(&upper_label);
        let lower_head = U::head(&lower_label);
        let upper = self.alloc(&upper_label, parent);
        let tenants = self.nodes[child as usize].tenants.clone();
        self.edit(upper, |n| n.tenants = tenants);
        self.edit(child, |c| {
            c.size = U::size(&lower_label) as u32;
            c.label = lower_label;
            c.parent = upper;
        });
        self.edit(upper, |n| n.children.set(lower_head, child));
        self.edit(parent, |n| n.children.set(head, upper));
        // Totals are unchanged: the two halves' sizes add up to the old one, tenants alike.
        self.pairs += self.nodes[upper as usize].tenants.len();
        for k in 0..self.nodes[upper as usize].tenants.len() {
            let (t, tick) = self.nodes[upper as usize].tenants[k];
            let depth = self.nodes[upper as usize].depth;
            self.push_lru(Reverse((tick, Reverse(depth), upper, t)));
        }
        upper
    }

    fn push_lru(&mut self, entry: LruEntry) {
        if self.lru.len() == self.lru.capacity() {
            self.lru.reserve_exact((self.lru.len() / 8).max(256));
        }
        self.lru.push(entry);
    }

    fn touch(&mut self, node: u32, tenant: TenantId, tick: u64) {
        let added = self.edit(node, |n| match n.tenants.binary_search_by_key(&tenant, |e| e.0) {
            Ok(k) => {
                n.tenants[k].1 = tick;
                None
            }
            Err(k) => {
                if n.tenants.len() == n.tenants.capacity() {
                    n.tenants.reserve_exact(if n.tenants.is_empty() { 1 } else { n.tenants.len() / 2 + 1 });
                }
                n.tenants.insert(k, (tenant, tick));
                Some(n.size as usize)
            }
        });
        if let Some(size) = added {
            self.total += size;
            *self.per_tenant.entry(tenant).or_default() += size;
            self.pairs += 1;
        }
        let depth = self.nodes[node as usize].depth;
        self.push_lru(Reverse((tick, Reverse(depth), node, tenant)));
    }

    /// Evicts LRU (node, tenant) pairs until the total is ≤ `limit`, never touching pairs
    /// from tick `keep` (the prompt being inserted).
    pub fn evict_to(&mut self, limit: usize, keep: u64) {
        while self.total > limit || self.live_bytes() > self.max_bytes {
            let Some(Reverse((tick, _, node, tenant))) = self.lru.peek().copied() else {
                break;
            };
            if tick >= keep {
                break;
            }
            self.lru.pop();
            self.remove_pair(node, tenant, tick);
        }
    }

    /// Evicts down to `limit` stored units and `limit_bytes` of live memory (the background
    /// sweep's low-water marks).
    pub fn trim(&mut self, limit: usize, limit_bytes: usize) {
        let max_bytes = std::mem::replace(&mut self.max_bytes, limit_bytes);
        self.evict_to(limit, u64::MAX);
        self.max_bytes = max_bytes;
    }

    fn remove_pair(&mut self, node: u32, tenant: TenantId, tick: u64) {
        let n = &mut self.nodes[node as usize];
        if !n.alive {
            return;
        }
        let Ok(k) = n.tenants.binary_search_by_key(&tenant, |e| e.0) else {
            return;
        };
        if n.tenants[k].1 != tick {
            return; // stale heap entry: touched again since
        }
        let size = n.size as usize;
        self.edit(node, |n| {
            n.tenants.remove(k);
            if n.tenants.capacity() > 2 * n.tenants.len() + 2 {
                n.tenants.shrink_to_fit();
            }
        });
        self.total -= size;
        self.pairs -= 1;
        if let Some(s) = self.per_tenant.get_mut(&tenant) {
            *s -= size;
            if *s == 0 {
                self.per_tenant.remove(&tenant);
            }
        }
        // Drop nodes nobody holds, walking up while parents become empty leaves.
        let mut cur = node;
        while cur != ROOT && self.nodes[cur as usize].tenants.is_empty() && self.nodes[cur as usize].children.is_empty()
        {
            let parent = self.nodes[cur as usize].parent;
            let head = U::head(&self.nodes[cur as usize].label);
            self.edit(parent, |n| n.children.remove(head));
            self.edit(cur, |dead| {
                dead.alive = false;
                dead.label = Box::new([]);
                dead.children = Children::Few(Vec::new());
                dead.tenants = Vec::new();
            });
            Self::grow(&mut self.free, 64);
            self.free.push(cur);
            cur = parent;
        }
    }

    /// Forgets a tenant entirely (a worker removed from the fleet).
    pub fn remove_tenant(&mut self, tenant: TenantId) {
        let victims: Vec<(u32, u64, u32)> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.alive)
            .filter_map(|(i, n)| {
                n.tenants.iter().find(|(t, _)| *t == tenant).map(|(_, tick)| (i as u32, *tick, n.depth))
            })
            .collect();
        // Deepest first, so parents become leaves before they are visited.
        let mut victims = victims;
        victims.sort_by_key(|v| Reverse(v.2));
        for (node, tick, _) in victims {
            self.remove_pair(node, tenant, tick);
        }
    }

    fn rebuild_lru(&mut self) {
        let mut heap = BinaryHeap::with_capacity(self.pairs + self.pairs / 8);
        for (i, n) in self.nodes.iter().enumerate().filter(|(_, n)| n.alive) {
            for (t, tick) in &n.tenants {
                heap.push(Reverse((*tick, Reverse(n.depth), i as u32, *t)));
            }
        }
        self.lru = heap;
    }

    /// Checks the structural invariants (tests): sizes add up, tenants of a child are a
    /// subset of its parent's, child keys match labels, depths are consistent.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut total = 0usize;
        for (i, n) in self.nodes.iter().enumerate().filter(|(_, n)| n.alive) {
            total += n.size as usize * n.tenants.len();
            if i as u32 != ROOT {
                let p = &self.nodes[n.parent as usize];
                if !p.alive || p.children.get(U::head(&n.label)) != Some(i as u32) {
                    return Err(format!("node {i} not linked from its parent"));
                }
                if n.depth != p.depth + n.size {
                    return Err(format!("node {i} depth"));
                }
                if n.parent != ROOT && !n.tenants.iter().all(|(t, _)| p.tenants.iter().any(|(pt, _)| pt == t)) {
                    return Err(format!("node {i} has a tenant its parent lacks"));
                }
                if n.label.is_empty() {
                    return Err(format!("node {i} has an empty label"));
                }
            }
            if !n.tenants.windows(2).all(|w| w[0].0 < w[1].0) {
                return Err(format!("node {i} tenants unsorted"));
            }
            let mut bad = None;
            n.children.for_each(|c| {
                if self.nodes[c as usize].parent != i as u32 {
                    bad = Some(c);
                }
            });
            if let Some(c) = bad {
                return Err(format!("child {c} of {i} has another parent"));
            }
        }
        if total != self.total {
            return Err(format!("total {} but nodes add up to {total}", self.total));
        }
        let heap: usize = self.nodes.iter().filter(|n| n.alive).map(Self::heap_of).sum();
        if heap != self.heap {
            return Err(format!("heap {} but nodes own {heap}", self.heap));
        }
        Ok(())
    }
}

/// A tree behind a reader/writer lock: matches run in parallel; an insert takes the write
/// lock for its own O(length) walk only (match and insert are never one critical section).
#[derive(Debug)]
pub struct SharedTree<U: Unit>(std::sync::RwLock<RadixTree<U>>);

impl<U: Unit> SharedTree<U> {
    /// An empty tree bounded by `max_size`.
    pub fn new(max_size: usize) -> Self {
        Self(std::sync::RwLock::new(RadixTree::new(max_size)))
    }
    /// See [`RadixTree::match_prefix`].
    pub fn match_prefix(&self, key: &[U]) -> PrefixMatch {
        self.0.read().unwrap_or_else(|p| p.into_inner()).match_prefix(key)
    }
    /// See [`RadixTree::insert`].
    pub fn insert(&self, key: &[U], tenant: TenantId) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).insert(key, tenant)
    }
    /// Runs `f` with exclusive access (maintenance, statistics).
    pub fn with<R>(&self, f: impl FnOnce(&mut RadixTree<U>) -> R) -> R {
        f(&mut self.0.write().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The prefix trees a cache-affinity policy keeps: one for text (bytes) and one for token-id
/// requests, keyed by what the request carries. Both share one byte budget (an insert into
/// one tree may use what the other does not) and each is bounded by `max_size` stored units.
#[derive(Debug)]
pub struct PrefixIndex {
    text: SharedTree<u8>,
    tokens: SharedTree<u32>,
    max_size: usize,
    max_bytes: usize,
    /// Live bytes of each tree after its last change, read without its lock.
    text_bytes: AtomicUsize,
    token_bytes: AtomicUsize,
}

impl PrefixIndex {
    /// Empty trees, each bounded by `max_size` units, both together by `max_bytes`.
    pub fn new(max_size: usize, max_bytes: usize) -> Self {
        Self {
            text: SharedTree(std::sync::RwLock::new(RadixTree::bounded(max_size, max_bytes))),
            tokens: SharedTree(std::sync::RwLock::new(RadixTree::bounded(max_size, max_bytes))),
            max_size,
            max_bytes,
            text_bytes: AtomicUsize::new(0),
            token_bytes: AtomicUsize::new(0),
        }
    }

    /// Per-worker matches of `key` (`None` when the request has nothing to match on).
    pub fn matches(&self, key: &crate::request::RoutingText) -> Option<PrefixMatch> {
        use crate::request::RoutingText;
        match key {
            RoutingText::Text(s) => Some(self.text.match_prefix(s.as_bytes())),
            RoutingText::Tokens(t) => Some(self.tokens.match_prefix(t)),
            RoutingText::None => None,
        }
    }

    /// Records `key` as cached on `worker`, within the shared byte budget. A worker removed
    /// meanwhile (the choice was made on an older snapshot) is forgotten again at once: the
    /// registry retires a worker before announcing its removal, so either this check or the
    /// announcement cleans up.
    pub fn record(&self, key: &crate::request::RoutingText, worker: &crate::workers::Worker) {
        use crate::request::RoutingText;
        match key {
            RoutingText::Text(s) => {
                Self::insert(&self.text, s.as_bytes(), worker.id(), self.max_bytes, &self.text_bytes, &self.token_bytes)
            }
            RoutingText::Tokens(t) => {
                Self::insert(&self.tokens, t, worker.id(), self.max_bytes, &self.token_bytes, &self.text_bytes)
            }
            RoutingText::None => return,
        }
        if worker.is_retired() {
            self.forget(worker.id());
        }
    }

    fn insert<U: Unit>(
        tree: &SharedTree<U>,
        key: &[U],
        tenant: TenantId,
        budget: usize,
        own: &AtomicUsize,
        other: &AtomicUsize,
    ) {
        tree.with(|t| {
            t.set_max_bytes(budget.saturating_sub(other.load(Ordering::Relaxed)));
            t.insert(key, tenant);
            own.store(t.live_bytes(), Ordering::Relaxed);
        });
    }

    /// Forgets everything recorded for `tenant` (a worker that left the fleet).
    pub fn forget(&self, tenant: TenantId) {
        self.text.with(|t| {
            t.remove_tenant(tenant);
            self.text_bytes.store(t.live_bytes(), Ordering::Relaxed);
        });
        self.tokens.with(|t| {
            t.remove_tenant(tenant);
            self.token_bytes.store(t.live_bytes(), Ordering::Relaxed);
        });
    }

    /// Every tenant with something stored in either tree, and its total size, by tenant.
    pub fn tenant_sizes(&self) -> Vec<(TenantId, usize)> {
        let mut all = self.text.with(|t| t.tenant_sizes());
        all.extend(self.tokens.with(|t| t.tenant_sizes()));
        all.sort_unstable();
        let mut merged: Vec<(TenantId, usize)> = Vec::with_capacity(all.len());
        for (t, s) in all {
            match merged.last_mut() {
                Some(last) if last.0 == t => last.1 += s,
                _ => merged.push((t, s)),
            }
        }
        merged
    }

    /// Trims both trees to 90 % of their bounds (the background sweep), so inserts rarely
    /// evict on the request path.
    pub fn trim(&self) {
        let low_size = self.max_size / 10 * 9;
        let share = |other: &AtomicUsize| (self.max_bytes.saturating_sub(other.load(Ordering::Relaxed))) / 10 * 9;
        self.text.with(|t| {
            t.trim(low_size, share(&self.token_bytes));
            self.text_bytes.store(t.live_bytes(), Ordering::Relaxed);
        });
        self.tokens.with(|t| {
            t.trim(low_size, share(&self.text_bytes));
            self.token_bytes.store(t.live_bytes(), Ordering::Relaxed);
        });
    }

    /// Stored sizes (characters or tokens × workers) of the text and token trees.
    pub fn sizes(&self) -> (usize, usize) {
        (self.text.with(|t| t.total_size()), self.tokens.with(|t| t.total_size()))
    }

    /// Memory of both trees, bytes (what the allocator holds for them).
    pub fn memory_bytes(&self) -> usize {
        self.text.with(|t| t.memory_bytes()) + self.tokens.with(|t| t.memory_bytes())
    }

    /// The byte budget.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefixes_split_and_match_per_tenant() {
        let mut t = RadixTree::<u8>::new(usize::MAX);
        t.insert(b"system: be brief\nuser: hello", 1);
        t.insert(b"system: be brief\nuser: bye", 2);
        t.check_invariants().unwrap();
        let m = t.match_prefix(b"system: be brief\nuser: hello again");
        assert_eq!(m.of(1), 28);
        assert_eq!(m.of(2), 23);
        assert_eq!(m.of(3), 0);
        assert_eq!(m.key_size, 34);
        assert_eq!(t.total_size(), 28 + 26);
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        let mut t = RadixTree::<u8>::new(usize::MAX);
        // 'é' (c3 a9) and 'è' (c3 a8) share a lead byte.
        t.insert("café".as_bytes(), 1);
        t.insert("cafè".as_bytes(), 2);
        t.check_invariants().unwrap();
        let m = t.match_prefix("café au lait".as_bytes());
        assert_eq!((m.of(1), m.of(2)), (4, 3));
        assert_eq!(t.tenant_size(1), 4);
    }

    #[test]
    fn bound_holds_and_lru_goes_first() {
        let mut t = RadixTree::<u32>::new(100);
        t.insert(&(0..60).collect::<Vec<_>>(), 1);
        t.insert(&(1000..1060).collect::<Vec<_>>(), 2);
        assert!(t.total_size() <= 100);
        assert_eq!(t.match_prefix(&(1000..1060).collect::<Vec<_>>()).of(2), 60, "newest kept whole");
        assert!(t.match_prefix(&(0..60).collect::<Vec<_>>()).of(1) < 60, "oldest trimmed");
        // One prompt larger than the bound is kept (bound exceeded by at most one prompt).
        t.insert(&(5000..5300).collect::<Vec<_>>(), 3);
        assert_eq!(t.total_size(), 300);
        t.check_invariants().unwrap();
        t.remove_tenant(3);
        assert_eq!(t.total_size(), 0);
        assert_eq!(t.node_count(), 1);
    }

    #[test]
    fn matches_for_sorted_and_unsorted_candidates() {
        let mut t = RadixTree::<u32>::new(usize::MAX);
        for tenant in [2, 5, 9] {
            t.insert(&[1, 2, 3, tenant], tenant);
        }
        t.insert(&[1, 2], 7);
        let m = t.match_prefix(&[1, 2, 3, 5]);
        assert_eq!(m.of_each([1, 2, 5, 7, 9, 10]), vec![0, 3, 4, 2, 3, 0]);
        assert_eq!(m.of_each([9, 5, 2, 7]), vec![3, 4, 3, 2]);
    }

    #[test]
    fn the_byte_bound_holds_and_its_accounting_is_exact() {
        let mut t = RadixTree::<u8>::bounded(usize::MAX, 200_000);
        let mut rng = 1u64;
        for i in 0..20_000 {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let key = format!("system {} user {i} {}", rng % 50, rng >> 40);
            t.insert(key.as_bytes(), (rng % 16) as u32);
            assert!(t.live_bytes() <= 200_000 + 1024, "insert {i}: {} bytes live", t.live_bytes());
        }
        t.check_invariants().unwrap();
        assert!(t.memory_bytes() < 200_000 * 5 / 4 + 64 * NODE, "{} bytes held", t.memory_bytes());
    }
}
