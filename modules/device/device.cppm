// meshrt.device — what a simulated chip is: its banks per buffer type (DeviceSpec and the
// presets of the chips users know) and its sparse memory. Meshes of chips are meshrt.mesh.
export module meshrt.device;

export import :spec;
export import :simulated_memory;
