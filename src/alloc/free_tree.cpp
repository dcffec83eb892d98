// The free tree of BankAllocator: a treap of free blocks keyed by address, each node knowing the
// largest free block in its subtree, so first fit is one walk down (ADR 0011).
module;
#include <algorithm>
#include <cstdint>

module meshrt.alloc;

namespace meshrt {

std::uint64_t BankAllocator::largest_in(Index tree) const { return tree == none ? 0 : slots_[tree].largest_below; }

void BankAllocator::refresh(Index node) {
  Slot& slot = slots_[node];
  slot.largest_below = std::max({slot.size, largest_in(slot.left), largest_in(slot.right)});
}

void BankAllocator::set_left(Index node, Index child) {
  slots_[node].left = child;
  if (child != none) slots_[child].parent = node;
}

void BankAllocator::set_right(Index node, Index child) {
  slots_[node].right = child;
  if (child != none) slots_[child].parent = node;
}

// Splits `tree` into the blocks below `address` and the rest (their roots' parents unset).
void BankAllocator::tree_split(Index tree, std::uint64_t address, Index& below, Index& rest) {
  if (tree == none) {
    below = rest = none;
    return;
  }
  if (slots_[tree].address < address) {
    Index right = none;
    tree_split(slots_[tree].right, address, right, rest);
    set_right(tree, right);
    below = tree;
  } else {
    Index left = none;
    tree_split(slots_[tree].left, address, below, left);
    set_left(tree, left);
    rest = tree;
  }
  slots_[tree].parent = none;
  refresh(tree);
}

// Joins two trees, every address of `below` under every address of `above`.
BankAllocator::Index BankAllocator::tree_merge(Index below, Index above) {
  if (below == none) return above;
  if (above == none) return below;
  if (slots_[below].priority > slots_[above].priority) {
    set_right(below, tree_merge(slots_[below].right, above));
    refresh(below);
    return below;
  }
  set_left(above, tree_merge(below, slots_[above].left));
  refresh(above);
  return above;
}

BankAllocator::Index BankAllocator::tree_insert(Index tree, Index node) {
  if (tree == none) return node;
  if (slots_[node].priority > slots_[tree].priority) {
    Index below = none;
    Index rest = none;
    tree_split(tree, slots_[node].address, below, rest);
    set_left(node, below);
    set_right(node, rest);
    refresh(node);
    return node;
  }
  if (slots_[node].address < slots_[tree].address) set_left(tree, tree_insert(slots_[tree].left, node));
  else set_right(tree, tree_insert(slots_[tree].right, node));
  refresh(tree);
  return tree;
}

void BankAllocator::tree_erase(Index node) {
  const Index parent = slots_[node].parent;
  const Index merged = tree_merge(slots_[node].left, slots_[node].right);
  if (parent == none) {
    root_ = merged;
    if (merged != none) slots_[merged].parent = none;
  } else if (slots_[parent].left == node) {
    set_left(parent, merged);
  } else {
    set_right(parent, merged);
  }
  if (parent != none) tree_update(parent);
}

// `node` changed its size, or its address without passing another free block: the tree's order
// still holds, only the figures above it may be stale. Up from the node while they change:
// usually a step or two, as a small block is rarely the largest of a big subtree.
void BankAllocator::tree_update(Index node) {
  for (Index at = node; at != none; at = slots_[at].parent) {
    const std::uint64_t before = slots_[at].largest_below;
    refresh(at);
    if (slots_[at].largest_below == before && at != node) break;
  }
}

BankAllocator::Index BankAllocator::lowest_fit(std::uint64_t rounded) const {
  Index at = root_;
  if (largest_in(at) < rounded) return none;
  while (true) {
    const Slot& slot = slots_[at];
    if (largest_in(slot.left) >= rounded) at = slot.left;
    else if (slot.size >= rounded) return at;
    else at = slot.right;
  }
}

BankAllocator::Index BankAllocator::highest_fit(std::uint64_t rounded) const {
  Index at = root_;
  if (largest_in(at) < rounded) return none;
  while (true) {
    const Slot& slot = slots_[at];
    if (largest_in(slot.right) >= rounded) at = slot.right;
    else if (slot.size >= rounded) return at;
    else at = slot.left;
  }
}

// The free block that contains `address`, if one does.
BankAllocator::Index BankAllocator::free_block_at(std::uint64_t address) const {
  Index found = none;
  for (Index at = root_; at != none;) {
    if (slots_[at].address <= address) {
      found = at;
      at = slots_[at].right;
    } else {
      at = slots_[at].left;
    }
  }
  if (found == none || address - slots_[found].address >= slots_[found].size) return none;
  return found;
}

}  // namespace meshrt
