//! The order a graph's nodes run in: operands first, in the order their
//! consumers were created, with views and fills sunk to just before their
//! first user. The scheduler (`coopc_compiler::schedule`) puts this order in
//! the plan; the CPU executor uses it only for graphs run without a plan
//! (tests, references). Each call is counted ([`order_calls`]), so a test
//! can show that running a compiled plan orders nothing.

use crate::{Graph, NodeId, Op};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};

static CALLS: AtomicU64 = AtomicU64::new(0);

/// How many times [`execution_order`] has run in this process.
pub fn order_calls() -> u64 {
    CALLS.load(Ordering::Relaxed)
}

/// The order the needed nodes (`needed[index]`) run in: creation order
/// (see `creation_order`: operands first, then whichever node's earliest
/// consumer was created first), except that nodes which make a
/// buffer at least as large as their operands' from them cheaply — a
/// broadcast, a transpose, a reshape, a fill, a one-hot — run just before
/// their first user instead of as soon as they can. Autodiff builds such
/// views of forward values while it builds the backward pass, and run
/// eagerly they would hold their (often broadcast-enlarged) buffers from
/// the forward pass on.
pub fn execution_order(g: &Graph, needed: &[bool]) -> Vec<NodeId> {
    CALLS.fetch_add(1, Ordering::Relaxed);
    let base = creation_order(g, needed);
    let bound = needed.len();
    let mut pos = vec![usize::MAX; bound];
    for (p, &id) in base.iter().enumerate() {
        pos[id.index()] = p;
    }
    // Sort key: (the step it is placed before, how far before it, its own
    // step). Users are keyed first, so chains of views sink together.
    let mut key: Vec<(usize, isize, usize)> = vec![(0, 0, 0); bound];
    for &id in base.iter().rev() {
        let p = pos[id.index()];
        let earliest_user = g
            .users(id)
            .into_iter()
            .filter(|u| needed[u.index()])
            .map(|u| key[u.index()])
            .min();
        key[id.index()] = match earliest_user {
            Some((major, minor, _)) if sinks(g.op(id)) => (major, minor - 1, p),
            _ => (p, 0, p),
        };
    }
    let mut order = base;
    order.sort_by_key(|id| key[id.index()]);
    order
}

/// The needed nodes in an order that follows their creation: operands
/// first, and among the nodes whose operands are done, the one whose
/// earliest consumer was created first (its own index when smaller).
/// Plain index order is not enough: a pass that rewrites a node creates
/// its replacement (or a constant it needs) at the end of the graph, and
/// index order would hold back everything downstream of that replacement
/// — a whole backward pass, with the forward activations it reads — until
/// the rest of the graph has run.
fn creation_order(g: &Graph, needed: &[bool]) -> Vec<NodeId> {
    let topo: Vec<NodeId> = g
        .topo_order()
        .into_iter()
        .filter(|id| needed[id.index()])
        .collect();
    let bound = needed.len();
    let mut prio = vec![usize::MAX; bound];
    let mut indeg = vec![0usize; bound];
    for &id in topo.iter().rev() {
        let earliest_user = g
            .users(id)
            .into_iter()
            .filter(|u| needed[u.index()])
            .map(|u| prio[u.index()])
            .min()
            .unwrap_or(usize::MAX);
        prio[id.index()] = id.index().min(earliest_user);
        let mut ins = g.inputs(id);
        ins.sort();
        ins.dedup();
        indeg[id.index()] = ins.len();
    }
    let mut ready: BinaryHeap<Reverse<(usize, usize)>> = topo
        .iter()
        .filter(|id| indeg[id.index()] == 0)
        .map(|id| Reverse((prio[id.index()], id.index())))
        .collect();
    let mut order = Vec::with_capacity(topo.len());
    while let Some(Reverse((_, i))) = ready.pop() {
        let id = NodeId::new(i);
        order.push(id);
        let mut users = g.users(id);
        users.sort();
        users.dedup();
        for u in users {
            if needed[u.index()] {
                indeg[u.index()] -= 1;
                if indeg[u.index()] == 0 {
                    ready.push(Reverse((prio[u.index()], u.index())));
                }
            }
        }
    }
    debug_assert_eq!(
        order.len(),
        topo.len(),
        "needed nodes form a closed subgraph"
    );
    order
}

/// Whether a node is computed just before its first user (see
/// [`execution_order`]).
fn sinks(op: &Op) -> bool {
    matches!(
        op,
        Op::Broadcast { .. }
            | Op::Permute { .. }
            | Op::Reshape { .. }
            | Op::Full { .. }
            | Op::Iota { .. }
            | Op::OneHot { .. }
    )
}
