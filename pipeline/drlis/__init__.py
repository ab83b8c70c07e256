"""DRLIS: a reinforcement-learned slice selector (double + dueling DQN, several voting agents).

``views``   what an agent sees, precomputed once per volume on a 2 mm z grid
``env``     the gymnasium environment used for training
``agent``   inference: agents stepped together through one engine call per step, then a vote
"""
