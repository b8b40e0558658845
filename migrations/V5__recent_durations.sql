-- Learning durations reads the most recently finished tasks of a work type, newest first: the
-- cost of planning must not grow with the history kept.
DROP INDEX tasks_work_type_finished;
CREATE INDEX tasks_work_type_finished ON tasks (work_type, finished_at DESC) WHERE status = 'succeeded';
