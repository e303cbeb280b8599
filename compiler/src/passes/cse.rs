//! Common-subexpression elimination: nodes with the same op and the same
//! operands are merged (operands of `add` and `mul` compared as a set).

use super::Pass;
use crate::ir::{BinaryOp, Graph, NodeId, Op};
use std::collections::HashMap;

pub struct CommonSubexpressions;

impl Pass for CommonSubexpressions {
    fn name(&self) -> &'static str {
        "cse"
    }

    fn run(&self, g: &mut Graph) -> bool {
        let mut seen: HashMap<(Op, Vec<NodeId>), NodeId> = HashMap::new();
        let mut changed = false;
        for id in g.topo_order() {
            let op = g.op(id).clone();
            if matches!(op, Op::Input { .. }) {
                continue;
            }
            let mut inputs = g.inputs(id);
            if matches!(op, Op::Binary(BinaryOp::Add | BinaryOp::Mul)) {
                inputs.sort_unstable();
            }
            match seen.get(&(op.clone(), inputs.clone())) {
                Some(&first) => {
                    g.replace_uses(id, first);
                    g.remove(id);
                    changed = true;
                }
                None => {
                    seen.insert((op, inputs), id);
                }
            }
        }
        changed
    }
}
