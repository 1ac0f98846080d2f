-- pgpush's message store (push_stream_store_messages on), version 2.
--
-- nginx installs this itself on its first connection when a location stores messages,
-- unless "push_stream_postgres_schema_install off": then a DBA runs this file (psql -f).
-- Installing again is harmless; nginx skips it when the recorded version is current (an
-- install's DDL locks the tables, so every worker running it at every start would
-- collide with the others' publishes). With "push_stream_postgres_schema NAME", nginx reads
-- every "pgpush." below as "NAME."; run the file through sed for the same by hand.
--
-- Each channel numbers its messages 1, 2, 3... (the "offset", push-stream's message id)
-- in commit order, with no holes: pgpush.publish() takes the channel's row lock in
-- pgpush.channels, which is held until the transaction ends, so two transactions that
-- publish to one channel commit one after the other in offset order. The epoch changes
-- when a channel's history is reset (an admin DELETE): a resume position is (epoch, offset).

SET LOCAL client_min_messages TO warning;
SELECT pg_advisory_xact_lock(7310151040527013617);

CREATE SCHEMA IF NOT EXISTS pgpush;

CREATE TABLE IF NOT EXISTS pgpush.schema_version (version integer NOT NULL);

CREATE TABLE IF NOT EXISTS pgpush.channels (
    channel      text PRIMARY KEY,
    epoch        bigint NOT NULL DEFAULT (extract(epoch FROM clock_timestamp()) * 1000)::bigint,
    last_offset  bigint NOT NULL DEFAULT 0,
    last_second  bigint NOT NULL DEFAULT 0,
    last_tag     integer NOT NULL DEFAULT 0
);
-- the oldest offset the cleaner left (it moves it), for stored_messages
ALTER TABLE pgpush.channels ADD COLUMN IF NOT EXISTS first_offset bigint NOT NULL DEFAULT 1;

CREATE TABLE IF NOT EXISTS pgpush.messages (
    id          bigserial PRIMARY KEY,
    channel     text NOT NULL,
    epoch       bigint NOT NULL,
    "offset"    bigint NOT NULL,
    payload     text,
    payload_bin bytea,
    event_id    text,
    event_type  text,
    second      bigint NOT NULL,
    tag         integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (channel, "offset")
);
-- BRIN: created_at grows with the id, and a BRIN index costs next to nothing to keep
CREATE INDEX IF NOT EXISTS messages_created_at ON pgpush.messages USING brin (created_at);

-- The LISTEN name of a channel: itself, or for a name longer than an identifier,
-- 'pgpush_' followed by the md5 of the whole name (the notification then names it).
-- Not STRICT, so that PostgreSQL inlines it into its callers' plans (a SQL function that is
-- not inlined is parsed again on every call); NULL still gives NULL.
CREATE OR REPLACE FUNCTION pgpush.listen_name(channel text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN octet_length(channel) > 63 THEN 'pgpush_' || md5(channel) ELSE channel END
$$;

-- Stores one message and notifies it, inside the caller's transaction: nothing is
-- delivered if it rolls back. Exactly one of text_payload and bin_payload is set. Gives
-- the row id, and how many messages the channel has from the oldest the cleaner left.
CREATE OR REPLACE FUNCTION pgpush.store_message(
    channel text, text_payload text, bin_payload bytea, event_id text, event_type text,
    OUT row_id bigint, OUT kept bigint
) LANGUAGE plpgsql AS $$
DECLARE
    now_s bigint := floor(extract(epoch FROM clock_timestamp()));
    c pgpush.channels;
    env jsonb;
    note text;
BEGIN
    IF channel IS NULL OR channel = '' THEN
        RAISE EXCEPTION 'pgpush.publish: the channel is empty' USING ERRCODE = '22023';
    END IF;
    -- the channel's row lock, held to the commit; an UPDATE costs less than the upsert,
    -- which only a channel's first message needs
    UPDATE pgpush.channels AS ch SET
        last_offset = ch.last_offset + 1,
        last_tag = CASE WHEN ch.last_second >= now_s THEN ch.last_tag + 1 ELSE 1 END,
        last_second = greatest(ch.last_second, now_s)
    WHERE ch.channel = store_message.channel
    RETURNING * INTO c;
    IF NOT FOUND THEN
        INSERT INTO pgpush.channels AS ch (channel, last_offset, last_second, last_tag)
            VALUES (channel, 1, now_s, 1)
        ON CONFLICT ON CONSTRAINT channels_pkey DO UPDATE SET
            last_offset = ch.last_offset + 1,
            last_tag = CASE WHEN ch.last_second >= now_s THEN ch.last_tag + 1 ELSE 1 END,
            last_second = greatest(ch.last_second, now_s)
        RETURNING * INTO c;
    END IF;
    INSERT INTO pgpush.messages
        (channel, epoch, "offset", payload, payload_bin, event_id, event_type, second, tag)
        VALUES (channel, c.epoch, c.last_offset, text_payload, bin_payload, event_id,
                event_type, c.last_second, c.last_tag)
        RETURNING id INTO row_id;
    env := jsonb_build_object('r', row_id, 'o', c.last_offset, 'e', c.epoch,
                              's', c.last_second, 'g', c.last_tag);
    IF event_id IS NOT NULL THEN env := env || jsonb_build_object('i', event_id); END IF;
    IF event_type IS NOT NULL THEN env := env || jsonb_build_object('y', event_type); END IF;
    IF octet_length(channel) > 63 THEN env := env || jsonb_build_object('n', channel); END IF;
    IF bin_payload IS NOT NULL THEN
        note := E'\x1bm' || (env || jsonb_build_object('b', translate(encode(bin_payload, 'base64'), E'\n', '')))::text;
    ELSE
        note := E'\x1bm' || (env || jsonb_build_object('t', text_payload))::text;
    END IF;
    IF octet_length(note) >= 8000 THEN
        -- too large for a notification: it carries the row id, and nginx fetches the row
        note := E'\x1bm' || (env || jsonb_build_object('f', true))::text;
    END IF;
    PERFORM pg_notify(pgpush.listen_name(channel), note);
    kept := c.last_offset - c.first_offset + 1;
END
$$;

-- The publishing functions are PL/pgSQL, whose plans are kept for the session: the body
-- of a SQL function that cannot be inlined is parsed again on every call.
CREATE OR REPLACE FUNCTION pgpush.publish_message(
    channel text, text_payload text, bin_payload bytea, event_id text, event_type text
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE r bigint;
BEGIN
    SELECT s.row_id INTO r FROM pgpush.store_message(channel, text_payload, bin_payload,
                                                      event_id, event_type) s;
    RETURN r;
END
$$;

CREATE OR REPLACE FUNCTION pgpush.publish(
    channel text, payload text, event_id text DEFAULT NULL, event_type text DEFAULT NULL
) RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    RETURN pgpush.publish_message(channel, payload, NULL, event_id, event_type);
END
$$;

CREATE OR REPLACE FUNCTION pgpush.publish(
    channel text, payload bytea, event_id text DEFAULT NULL, event_type text DEFAULT NULL
) RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    RETURN pgpush.publish_message(channel, NULL, payload, event_id, event_type);
END
$$;

-- The messages of a channel that are still kept: the newest max_stored (NULL: all) no
-- older than ttl.
CREATE OR REPLACE FUNCTION pgpush.kept(channel text, max_stored bigint, ttl interval)
RETURNS SETOF pgpush.messages LANGUAGE sql STABLE AS $$
    SELECT m.* FROM pgpush.messages m JOIN pgpush.channels c USING (channel)
    WHERE m.channel = kept.channel AND m.epoch = c.epoch
      AND (max_stored IS NULL OR m."offset" > c.last_offset - max_stored)
      AND m.created_at > clock_timestamp() - ttl
    ORDER BY m."offset"
$$;

-- How many messages a channel keeps (push-stream's stored_messages). Offsets have no
-- holes, so it is the distance from the oldest kept one: exact for the count limit, and
-- for the ttl as of the cleaner's last pass (at most a few seconds ago).
CREATE OR REPLACE FUNCTION pgpush.stored(channel text, max_stored bigint, ttl interval)
RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT greatest(0, least(c.last_offset - c.first_offset + 1,
                                              coalesce(max_stored, c.last_offset)))
                     FROM pgpush.channels c WHERE c.channel = stored.channel), 0)
$$;

-- nginx's batch: publishes in order, and gives how many messages each channel keeps after
-- its message (bins are base64).
CREATE OR REPLACE FUNCTION pgpush.publish_batch(
    channels text[], texts text[], bins text[], event_ids text[], event_types text[],
    max_stored bigint, ttl interval
) RETURNS SETOF bigint LANGUAGE plpgsql AS $$
DECLARE n bigint;
BEGIN
    FOR k IN 1 .. coalesce(array_length(channels, 1), 0) LOOP
        SELECT s.kept INTO n FROM pgpush.store_message(channels[k], texts[k],
            decode(bins[k], 'base64'), event_ids[k], event_types[k]) s;
        RETURN NEXT greatest(0, least(n, coalesce(max_stored, n)));
    END LOOP;
END
$$;

-- Deletes what no channel keeps any more. One cleaner at a time across every nginx:
-- a call that finds another one running returns NULL at once.
CREATE OR REPLACE FUNCTION pgpush.clean(max_stored bigint, ttl interval) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE n bigint := 0; k bigint;
BEGIN
    IF NOT pg_try_advisory_xact_lock(7310151040527013618) THEN
        RETURN NULL;
    END IF;
    WITH gone AS (
        DELETE FROM pgpush.messages WHERE created_at <= clock_timestamp() - ttl
        RETURNING channel, epoch, "offset"
    ), newest AS (
        SELECT channel, epoch, max("offset") AS o, count(*) AS n FROM gone GROUP BY 1, 2
    ), moved AS (
        UPDATE pgpush.channels c SET first_offset = greatest(c.first_offset, newest.o + 1)
        FROM newest WHERE c.channel = newest.channel AND c.epoch = newest.epoch
    )
    SELECT coalesce(sum(newest.n), 0) INTO n FROM newest;
    IF max_stored IS NOT NULL THEN
        DELETE FROM pgpush.messages m USING pgpush.channels c
        WHERE m.channel = c.channel AND (m.epoch <> c.epoch OR m."offset" <= c.last_offset - max_stored);
        GET DIAGNOSTICS k = ROW_COUNT;
        n := n + k;
    END IF;
    RETURN n;
END
$$;

-- Forgets a channel's history (an admin DELETE): a new epoch, offsets from 1 again.
CREATE OR REPLACE FUNCTION pgpush.reset(channel text) RETURNS void LANGUAGE sql AS $$
    DELETE FROM pgpush.messages WHERE messages.channel = reset.channel;
    UPDATE pgpush.channels SET epoch = greatest(epoch + 1, (extract(epoch FROM clock_timestamp()) * 1000)::bigint),
        last_offset = 0, last_tag = 0, first_offset = 1
    WHERE channels.channel = reset.channel;
$$;

DELETE FROM pgpush.schema_version;
INSERT INTO pgpush.schema_version VALUES (2);
