// Types of the realtime gateway client (index.js).

export type TransportName = 'websocket' | 'sse' | 'poll';

/** The transports, in the default fallback order. */
export const TRANSPORTS: readonly TransportName[];

/** "I have every publication of `epoch` up to `offset`." */
export interface Position {
  epoch: string;
  offset: number;
  /** Tag of the publication at `offset` (8 hex digits), when known. */
  tag?: string;
}

export interface Publication<T = unknown> {
  channel: string;
  offset: number;
  epoch: string;
  /** Random per publication, 8 hex digits: (epoch, offset, tag) names one publication. */
  tag: string;
  data: T;
  /** On a conflating namespace: how many publications right before this one were dropped. */
  skipped?: number;
}

/** Publications of `channel` were lost; delivery continues after `offset` of `epoch`. */
export interface Reset {
  channel: string;
  reason: 'epoch_changed' | 'history_truncated' | 'offset_ahead' | string;
  epoch: string;
  offset: number;
}

/** The server ended a subscription (e.g. `permission_revoked` after a token refresh). */
export interface Unsubscribed {
  channel: string;
  reason: 'permission_revoked' | string;
}

/** One member of a channel's presence: a connection. */
export interface Member {
  client: string;
  /** The token's `sub`; null for an anonymous connection. */
  user: string | null;
  /** The token's `info` claim, when it has one. */
  info?: unknown;
}

/** A channel's presence (`clients` absent for a count-only read). */
export interface PresenceResult {
  channel: string;
  count: number;
  users: number;
  clients?: Member[];
}

/** A member joined or left a channel (namespaces with `join_leave`). */
export interface PresenceEvent {
  channel: string;
  join?: Member;
  leave?: Member;
}

export interface PublishAck {
  channel: string;
  offset: number;
  epoch: string;
  tag: string;
}

export type ConnectionState = 'connecting' | 'connected' | 'disconnected' | 'closed';

export interface StateEvent {
  state: ConnectionState;
  transport: TransportName;
  endpoint: string;
  /** Set with `disconnected`: the delay before the next attempt. */
  retryInMs?: number;
}

export interface StorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

export interface BackoffOptions {
  /** Cap of the first retry's delay (default 500). */
  initialMs?: number;
  /** Largest cap (default 15000). */
  maxMs?: number;
}

export interface ClientOptions {
  /** Fallback order (default `['websocket', 'sse', 'poll']`). */
  transports?: TransportName[];
  backoff?: BackoffOptions;
  /** Keep positions across page reloads: `'session'`, `'local'`, a Storage, or false (default). */
  persist?: 'session' | 'local' | StorageLike | false;
  /** Storage key of the positions (default `'realtime-gateway'`). */
  storageKey?: string;
  /** Long-poll wait, in seconds (default 25; the server allows up to `poll.max_timeout`). */
  pollTimeout?: number;
  /** Retries of a publish whose outcome is unknown (default 3). */
  publishRetries?: number;
  /** A connection attempt that takes longer counts as failed (default 10000). */
  connectTimeoutMs?: number;
  /** Implementations to use instead of the globals (tests, non-browser runtimes). */
  WebSocket?: unknown;
  EventSource?: unknown;
  fetch?: typeof globalThis.fetch;
  /** A connection JWT, or a function returning the current one (sent as `?token=`). */
  token?: string | (() => string | null | undefined);
  /** Source of randomness for the backoff jitter (default Math.random). */
  random?: () => number;
}

export interface ClientEvents {
  state: StateEvent;
  reset: Reset;
  unsubscribed: Unsubscribed;
  position: { channel: string } & Position;
  join: PresenceEvent;
  leave: PresenceEvent;
  /** The server ended the client for good (4010 with `reconnect: false`). */
  closed: { code: number; reason?: string };
  error: Error;
}

export interface Subscription {
  unsubscribe(): void;
}

export declare class GatewayError extends Error {
  /** The server's snake_case error code (or `disconnected`, `closed`, `http_<status>`). */
  code: string;
  status?: number;
}

export declare class Client {
  readonly currentState: ConnectionState;
  readonly currentTransport: { transport: TransportName; endpoint: string };
  /** Channels with at least one handler. */
  channels(): string[];
  on<K extends keyof ClientEvents>(event: K, listener: (value: ClientEvents[K]) => void): () => void;
  /** Every publication of `channel`, exactly once and in order across reconnects. */
  subscribe<T = unknown>(
    channel: string,
    handler: (publication: Publication<T>) => void,
    options?: {
      onReset?: (reset: Reset) => void;
      onUnsubscribed?: (ended: Unsubscribed) => void;
      onJoin?: (member: Member, event: PresenceEvent) => void;
      onLeave?: (member: Member, event: PresenceEvent) => void;
      /** Without a stored position, start with the channel's newest publication. */
      latest?: boolean;
      /** Let the server send merge patches; the handler still gets full data (immutable). */
      delta?: boolean;
    },
  ): Subscription;
  /** Who is in `channel` (over the WebSocket when open, else `GET /presence`). */
  presence(channel: string, options?: { countOnly?: boolean }): Promise<PresenceResult>;
  /** Removes every handler of `channel` and forgets its position. */
  unsubscribe(channel: string): void;
  position(channel: string): Position | null;
  /** Resolves once the publication is stored (retried safely with an idempotency key). */
  publish(channel: string, data: unknown): Promise<PublishAck>;
  close(): void;
}

/** Connects to one or more gateway nodes (default: the page's origin). */
export function connect(endpoints?: string | string[], options?: ClientOptions): Client;

/** Delay before reconnect attempt `attempt`: full jitter below min(maxMs, initialMs * 2^attempt). */
export function backoffDelay(attempt: number, options?: BackoffOptions, random?: () => number): number;

/** The (transport, endpoint) pairs in the order they are tried. */
export function attemptPlan(
  transports: TransportName[],
  endpoints: string[],
): { transport: TransportName; endpoint: string }[];

/** The server's cursor for some positions (channels with a null position are left out). */
export function encodeCursor(positions: Iterable<[string, Position | null]>): string;
export function decodeCursor(cursor: string): Map<string, Position>;

export declare class Positions {
  constructor(storage?: StorageLike | null, key?: string);
  get(channel: string): Position | null;
  set(channel: string, epoch: string, offset: number): void;
  delete(channel: string): void;
  /** True (and the position advances) unless the publication is a duplicate. */
  accept(publication: Publication): boolean;
}

/** Applies a JSON Merge Patch (RFC 7396) to `target`, returning the result (`target` unchanged). */
export function applyMergePatch(target: unknown, patch: unknown): unknown;
