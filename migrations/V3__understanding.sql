-- Understanding and cost: which decomposer produced a decomposition and why it fell back, the
-- complexity of a plan term by term, what no agent could run, where estimated durations came
-- from, and which tasks a fallback decision sends to an external provider.

ALTER TABLE decompositions DROP COLUMN complexity;
ALTER TABLE decompositions ADD COLUMN confidence double precision NOT NULL DEFAULT 1
    CHECK (confidence BETWEEN 0 AND 1);
-- Why the configured decomposer's answer was not used (NULL when it was).
ALTER TABLE decompositions ADD COLUMN fallback_reason text;

-- Each term of the complexity formula, with its value and weight.
ALTER TABLE plans ADD COLUMN complexity_terms jsonb NOT NULL DEFAULT '[]';
-- The tasks that no agent could run when the plan was made, with the reasons.
ALTER TABLE plans ADD COLUMN infeasible jsonb NOT NULL DEFAULT '[]';

-- 'catalog', or the history the estimate was learnt from.
ALTER TABLE tasks ADD COLUMN duration_basis text NOT NULL DEFAULT 'catalog';

ALTER TABLE fallback_decisions ADD COLUMN external_tasks uuid[] NOT NULL DEFAULT '{}';
ALTER TABLE fallback_decisions ADD COLUMN infeasible boolean NOT NULL DEFAULT false;
ALTER TABLE fallback_decisions ADD COLUMN complexity_terms jsonb NOT NULL DEFAULT '[]';

-- Learning durations reads finished attempts by work type.
CREATE INDEX tasks_work_type_finished ON tasks (work_type) WHERE status = 'succeeded';
