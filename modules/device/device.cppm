// meshrt.device — simulated chips and the meshes that hold them.
export module meshrt.device;

export import :spec;
export import :simulated_memory;
export import :mesh;
