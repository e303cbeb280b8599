//! Graph-to-graph passes. Each pass is a value with a name and one method
//! that rewrites a graph in place; a `Pipeline` is an ordered list of them,
//! run to a fixed point. Every pass preserves the values of the outputs.

mod cse;
mod dce;
mod fold;
mod simplify;

pub use cse::{CommonSubexpressions, UNSHARED_FILL};
pub use dce::DeadCode;
pub use fold::ConstantFold;
pub use simplify::AlgebraicSimplify;

use crate::ir::Graph;

/// One rewrite of a graph.
pub trait Pass {
    /// Stable name, as shown in pass reports.
    fn name(&self) -> &'static str;
    /// Rewrites `g` in place; returns whether anything changed.
    fn run(&self, g: &mut Graph) -> bool;
}

/// What one pipeline run did: for each round, the passes that changed the graph.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PipelineReport {
    pub rounds: Vec<Vec<&'static str>>,
    pub nodes_before: usize,
    pub nodes_after: usize,
}

/// An ordered list of passes, repeated until none changes the graph (or a
/// round limit is hit).
pub struct Pipeline {
    passes: Vec<Box<dyn Pass>>,
    max_rounds: usize,
}

impl Pipeline {
    pub fn new(passes: Vec<Box<dyn Pass>>) -> Self {
        Pipeline {
            passes,
            max_rounds: 16,
        }
    }

    /// simplify → fold → CSE → DCE: the clean-up run after autodiff and lowering.
    pub fn standard() -> Self {
        Self::new(vec![
            Box::new(AlgebraicSimplify),
            Box::new(ConstantFold::default()),
            Box::new(CommonSubexpressions),
            Box::new(DeadCode),
        ])
    }

    pub fn pass_names(&self) -> Vec<&'static str> {
        self.passes.iter().map(|p| p.name()).collect()
    }

    pub fn run(&self, g: &mut Graph) -> PipelineReport {
        let mut report = PipelineReport {
            nodes_before: g.node_count(),
            ..Default::default()
        };
        for _ in 0..self.max_rounds {
            let changed: Vec<&'static str> = self
                .passes
                .iter()
                .filter(|p| p.run(g))
                .map(|p| p.name())
                .collect();
            if changed.is_empty() {
                break;
            }
            report.rounds.push(changed);
        }
        report.nodes_after = g.node_count();
        report
    }
}
