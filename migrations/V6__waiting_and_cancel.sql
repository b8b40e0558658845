-- Work waits for the fleet instead of failing, and a request can be cancelled.
--
-- A ready task that no agent can take now is 'waiting': in one line across every plan, ordered by
-- priority, then by turn (a plan's k-th waiting task has turn k from when it joined, so that plans
-- take turns instead of the first one being served whole), then by how long it has waited.

-- The request's priority, on each task: the line is ordered across plans without a join.
ALTER TABLE tasks ADD COLUMN priority smallint NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 9);
UPDATE tasks t SET priority = r.priority FROM plans p JOIN requests r ON r.id = p.request_id
WHERE p.id = t.plan_id AND r.priority <> 0;

ALTER TABLE tasks ADD COLUMN waiting_since timestamptz;
ALTER TABLE tasks ADD COLUMN wait_turn bigint;
ALTER TABLE tasks ADD CHECK ((status = 'waiting') = (waiting_since IS NOT NULL AND wait_turn IS NOT NULL));

-- The line, in the order the placement pass takes it; and its oldest, for the longest wait allowed.
CREATE INDEX tasks_line ON tasks (priority DESC, wait_turn, waiting_since, position, id) WHERE status = 'waiting';
CREATE INDEX tasks_waiting_since ON tasks (waiting_since) WHERE status = 'waiting';

-- A task that waited longer than allowed has a routing decision that chose no agent: it records
-- every candidate's verdict, and why the task gave up.
ALTER TABLE routing_decisions ALTER COLUMN agent_id DROP NOT NULL;
-- When the attempt became ready to go to an agent (it was released, or it began to wait): the
-- wait from ready to dispatch is the dispatch's confirmation less this.
ALTER TABLE routing_decisions ADD COLUMN ready_at timestamptz;

-- Who cancelled a request, when and why; one row per request.
CREATE TABLE cancellations (
    request_id  uuid PRIMARY KEY REFERENCES requests (id),
    cancelled_by text       NOT NULL,
    reason      text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
