//! Common-subexpression elimination: nodes with the same op and the same
//! operands are merged (operands of `add` and `mul` compared as a set).
//! A large fill (over `UNSHARED_FILL` elements) that a non-elementwise op
//! reads is left alone: such a reader needs the fill written out, and a
//! shared one holds its buffer from its first reader to its last — autodiff
//! makes a zero base of the logits' shape for every log-softmax backward,
//! and merged they would be one `[rows, vocab]` buffer alive for the whole
//! program. (Elementwise readers take fills as inlined constants, so
//! merging those costs nothing and lets their users merge in turn.)

use super::Pass;
use crate::ir::{BinaryOp, Graph, NodeId, Op};
use std::collections::HashMap;

pub struct CommonSubexpressions;

/// Fills of more elements than this are never merged (1 MiB in f32).
pub const UNSHARED_FILL: usize = 1 << 18;

impl Pass for CommonSubexpressions {
    fn name(&self) -> &'static str {
        "cse"
    }

    fn run(&self, g: &mut Graph) -> bool {
        let mut seen: HashMap<(Op, Vec<NodeId>), NodeId> = HashMap::new();
        let mut changed = false;
        for id in g.topo_order() {
            let op = g.op(id).clone();
            let fill = matches!(op, Op::Full { .. } | Op::Iota { .. })
                && g.ty(id).numel() > UNSHARED_FILL
                && g.users(id).iter().any(|&u| !g.op(u).is_elementwise());
            if matches!(op, Op::Input { .. }) || fill {
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
