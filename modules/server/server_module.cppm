// meshrt.server — the allocation server: the Ledger (pure state) and the Server (socket loop).
// Independent of the runtime: it never imports device or buffer.
export module meshrt.server;

export import :ledger;
export import :history;
export import :server;
