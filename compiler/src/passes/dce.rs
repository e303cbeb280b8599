//! Dead-code elimination: removes every node that no output depends on.
//! Inputs are kept even when unused, so a graph's interface does not change.

use super::Pass;
use crate::ir::{Graph, NodeId, Op};
use std::collections::HashSet;

pub struct DeadCode;

impl Pass for DeadCode {
    fn name(&self) -> &'static str {
        "dce"
    }

    fn run(&self, g: &mut Graph) -> bool {
        let mut live: HashSet<NodeId> = HashSet::new();
        let mut stack: Vec<NodeId> = g.outputs().iter().map(|&(_, id)| id).collect();
        while let Some(n) = stack.pop() {
            if live.insert(n) {
                stack.extend(g.inputs(n));
            }
        }
        let dead: Vec<NodeId> = g
            .node_ids()
            .filter(|id| !live.contains(id) && !matches!(g.op(*id), Op::Input { .. }))
            .collect();
        for &id in &dead {
            g.remove(id);
        }
        !dead.is_empty()
    }
}
