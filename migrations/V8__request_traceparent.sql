-- The trace context (W3C traceparent) of the handling that recorded each request, so that what
-- is done for it later on another message's behalf (a task placed from the line of waiting
-- tasks, woken by a periodic wake-up or another request's result) continues its trace.
-- Null for requests recorded before, or without a trace context.
ALTER TABLE requests ADD COLUMN traceparent text;
