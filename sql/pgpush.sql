-- pgpush's message store (push_stream_store_messages on), version 1.
--
-- nginx installs this itself on its first connection when a location stores messages,
-- unless "push_stream_postgres_schema_install off": then a DBA runs this file (psql -f).
-- Installing again is harmless. With "push_stream_postgres_schema NAME", nginx reads
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
CREATE INDEX IF NOT EXISTS messages_created_at ON pgpush.messages (created_at);

-- The LISTEN name of a channel: itself, or for a name longer than an identifier,
-- 'pgpush_' followed by the md5 of the whole name (the notification then names it).
CREATE OR REPLACE FUNCTION pgpush.listen_name(channel text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT CASE WHEN octet_length(channel) > 63 THEN 'pgpush_' || md5(channel) ELSE channel END
$$;

-- Stores one message and notifies it, inside the caller's transaction: nothing is
-- delivered if it rolls back. Exactly one of text_payload and bin_payload is set.
CREATE OR REPLACE FUNCTION pgpush.publish_message(
    channel text, text_payload text, bin_payload bytea, event_id text, event_type text
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    now_s bigint := floor(extract(epoch FROM clock_timestamp()));
    c pgpush.channels;
    row_id bigint;
    env jsonb;
    note text;
BEGIN
    IF channel IS NULL OR channel = '' THEN
        RAISE EXCEPTION 'pgpush.publish: the channel is empty' USING ERRCODE = '22023';
    END IF;
    INSERT INTO pgpush.channels AS ch (channel, last_offset, last_second, last_tag)
        VALUES (channel, 1, now_s, 1)
    ON CONFLICT ON CONSTRAINT channels_pkey DO UPDATE SET
        last_offset = ch.last_offset + 1,
        last_tag = CASE WHEN ch.last_second >= now_s THEN ch.last_tag + 1 ELSE 1 END,
        last_second = greatest(ch.last_second, now_s)
    RETURNING * INTO c;
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
    RETURN row_id;
END
$$;

CREATE OR REPLACE FUNCTION pgpush.publish(
    channel text, payload text, event_id text DEFAULT NULL, event_type text DEFAULT NULL
) RETURNS bigint LANGUAGE sql AS $$
    SELECT pgpush.publish_message(channel, payload, NULL, event_id, event_type)
$$;

CREATE OR REPLACE FUNCTION pgpush.publish(
    channel text, payload bytea, event_id text DEFAULT NULL, event_type text DEFAULT NULL
) RETURNS bigint LANGUAGE sql AS $$
    SELECT pgpush.publish_message(channel, NULL, payload, event_id, event_type)
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

-- How many messages a channel keeps (push-stream's stored_messages).
CREATE OR REPLACE FUNCTION pgpush.stored(channel text, max_stored bigint, ttl interval)
RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        (SELECT c.last_offset - min(m."offset") + 1
         FROM pgpush.channels c JOIN pgpush.messages m USING (channel, epoch)
         WHERE c.channel = stored.channel
           AND (max_stored IS NULL OR m."offset" > c.last_offset - max_stored)
           AND m.created_at > clock_timestamp() - ttl
         GROUP BY c.last_offset), 0)
$$;

-- nginx's batch: publishes in order, and gives how many messages each channel keeps after
-- its message (bins are base64).
CREATE OR REPLACE FUNCTION pgpush.publish_batch(
    channels text[], texts text[], bins text[], event_ids text[], event_types text[],
    max_stored bigint, ttl interval
) RETURNS SETOF bigint LANGUAGE plpgsql AS $$
BEGIN
    FOR k IN 1 .. coalesce(array_length(channels, 1), 0) LOOP
        PERFORM pgpush.publish_message(channels[k], texts[k], decode(bins[k], 'base64'),
                                       event_ids[k], event_types[k]);
        RETURN NEXT pgpush.stored(channels[k], max_stored, ttl);
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
    DELETE FROM pgpush.messages WHERE created_at <= clock_timestamp() - ttl;
    GET DIAGNOSTICS n = ROW_COUNT;
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
        last_offset = 0, last_tag = 0
    WHERE channels.channel = reset.channel;
$$;

DELETE FROM pgpush.schema_version;
INSERT INTO pgpush.schema_version VALUES (1);
